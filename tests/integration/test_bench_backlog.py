"""``conveyor bench --backlog`` at small sizes: it loads the backlog, measures the submit
rate beside it and two dispatch windows of the backlog's own tasks, and prints the
table's and indexes' sizes and the claim's plan (a smoke run: no timing asserted)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

from conveyor.bench.backlog import backlog_ids

pytestmark = pytest.mark.slow


def test_backlog_ids_sort_in_claim_order() -> None:
    ids = backlog_ids(3, 1_000) + backlog_ids(1, 1_003)
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert all(i.version == 7 for i in ids)
    assert backlog_ids(1, 0)[0] < backlog_ids(1, 10**9)[0]


async def test_bench_backlog_prints_its_figures(database_dsn: str) -> None:
    done = await conveyor(
        "bench", "--backlog", "300", "--dispatch", "200", "--churn", "100", "--tasks", "100",
        "--workers", "1", "--concurrency", "50", "--batch", "50", "--dsn", database_dsn,
        "--json",
        timeout=300,
    )  # fmt: skip
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    # The backlog, the two windows and the churn between them.
    assert figures["backlog"] == 300 and figures["loaded"] == 300 + 100 + 2 * 200
    assert figures["load_rows_per_s"] > 0 and figures["submit_per_s"] > 0
    first, churned = figures["windows"]
    assert (first["name"], first["after"], first["tasks"]) == ("first", 0, 200)
    assert (churned["name"], churned["after"], churned["tasks"]) == ("churned", 300, 200)
    assert all(w["dispatch_per_s"] > 0 and w["e2e_per_s"] > 0 for w in figures["windows"])
    # The claim reads its ready index, in its order, at every point.
    plans = figures["claim_plans"]
    assert set(plans) == {"loaded", "after_first", "after_churned"}
    assert all(p["index"] == "tasks_ready" and p["on_index"] for p in plans.values()), plans
    # With the table's counters (PostgreSQL publishes them within a second or so: no
    # figure of them is asserted) and the plan itself.
    assert {"n_dead_tup", "n_tup_upd", "autovacuum_count"} <= set(plans["after_churned"])
    assert "Index Scan using tasks_ready" in plans["after_churned"]["plan"]
    for when in ("sizes_loaded", "sizes_end"):
        sizes = figures[when]
        assert sizes["table"] > 0 and sizes["index tasks_ready"] > 0
        assert sizes["indexes"] == sum(v for k, v in sizes.items() if k.startswith("index "))
    assert "dispatch first" in done.err and "claim plan after_churned" in done.err
