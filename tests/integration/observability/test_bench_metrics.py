"""``conveyor bench --metrics`` runs with the metrics of every process on and scraped (a
smoke run: tiny numbers, and no timing asserted; the lead compares the figures of full
runs with and without on a quiet machine)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

pytestmark = pytest.mark.slow


async def test_bench_with_metrics_scrapes_every_process(database_dsn: str) -> None:
    done = await conveyor(
        "bench", "--tasks", "60", "--workers", "1", "--concurrency", "20", "--batch", "30",
        "--latency-rate", "10", "--latency-seconds", "0.5", "--dsn", database_dsn,
        "--metrics", "--scrape-interval", "0.5", "--json",
        timeout=240,
    )  # fmt: skip
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    assert figures["metrics"] is True and figures["scrape_interval_s"] == 0.5
    assert figures["scraped_endpoints"] == 2, "the coordinator and the worker were scraped"
    assert figures["e2e_per_s"] > 0 and figures["pickup_samples"] == 5
    assert sum(figures["pickup_histogram_ms"].values()) == 5
    assert figures["pickup_p99_ms"] <= figures["pickup_max_ms"]
    assert 0 < figures["submit_latency_p50_ms"] <= figures["submit_latency_p99_ms"]
    assert "metrics on, scraped every 0.5 s" in done.err
    # CPU per task by process group (PostgreSQL's server is on this machine) and the idle
    # worker's memory.
    per_task = figures["cpu_per_task_us"]
    assert set(per_task) == {"coordinator", "workers", "client", "postgres", "total"}
    # CPU time is counted in clock ticks (10 ms): over 60 tasks one process group may
    # read 0 (a worker's ~3 ms did), the sum of all of them not.
    assert all(per_task[group] >= 0 for group in per_task) and per_task["total"] > 0, per_task
    assert per_task["total"] == pytest.approx(
        sum(v for k, v in per_task.items() if k != "total"), abs=0.5
    )
    per_probe = figures["cpu_per_probe_us"]
    assert set(per_probe) == set(per_task) and per_probe["total"] > 0, per_probe
    assert 10 < figures["worker_idle_rss_mb"] < 1000
    assert "CPU per task (e2e)" in done.err and "idle worker RSS" in done.err
