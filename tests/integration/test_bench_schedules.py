"""``conveyor bench-schedules`` at small sizes: per-second and per-minute schedules, some
created through the API and the rest inserted straight after the same validation; every
tick of the window fires, and the lags are printed by kind and at the minute boundary
(a smoke run: no timing asserted)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

pytestmark = pytest.mark.slow


async def test_bench_schedules_by_kind_across_a_minute_boundary() -> None:
    done = await conveyor(
        "bench-schedules", "--per-second", "40", "--per-minute", "60", "--api-creates", "20",
        "--seconds", "2", "--warm-up", "2", "--minute-boundaries", "1", "--json",
        timeout=300,
    )  # fmt: skip
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    assert figures["schedules"] == 100 and figures["api_creates"] == 20
    assert figures["kinds"]["per-minute"] == {"cron": "* * * * *", "count": 60}
    # The window holds a minute boundary: each per-minute schedule fired once in it.
    assert figures["window_s"] >= 2
    by_kind = figures["lags_by_kind"]
    assert by_kind["per-minute"]["n"] == 60
    assert by_kind["per-second"]["n"] == 40 * round(figures["window_s"])
    assert by_kind["per-second at second 0"]["n"] == 40
    assert figures["firings"] == figures["expected_firings"] == 60 + 40 * round(figures["window_s"])
    assert figures["lag_p99_ms"] is not None and figures["lag_p99_ms"] >= 0
    assert "per-second at second 0" in done.err
    # Which ticks were late (none need be): each entry names its tick and counts.
    for late in figures["late_ticks"]:
        assert 0 < late["late"] <= late["firings"] and late["max_ms"] > 100


async def test_bench_schedules_one_cron() -> None:
    done = await conveyor(
        "bench-schedules", "--schedules", "30", "--api-creates", "10", "--seconds", "2",
        "--warm-up", "2", "--json",
        timeout=300,
    )  # fmt: skip
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    assert figures["firings"] == figures["expected_firings"] == 60
    assert figures["create_per_s"] > 0 and figures["api_create_per_s"] > 0
