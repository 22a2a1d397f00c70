"""``conveyor bench-streams`` connects simulated worker streams, runs probe tasks through
them and prints its figures (a smoke run at 50 streams: no timing asserted)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

pytestmark = pytest.mark.slow


async def test_bench_streams_connects_every_stream_and_prints_its_figures(
    database_dsn: str,
) -> None:
    done = await conveyor(
        "bench-streams", "--streams", "50", "--processes", "2", "--rate", "20",
        "--seconds", "1", "--idle-seconds", "0.5", "--dsn", database_dsn, "--json",
        timeout=240,
    )  # fmt: skip
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    assert figures["connected"] == 50 and figures["processes"] == 2
    assert figures["connect_errors"] == {}
    assert figures["connect_s"] > 0
    # Every probe went through a simulated worker (its result is the pickup latency).
    assert figures["pickup_samples"] == 20
    assert 0 < figures["pickup_p50_ms"] <= figures["pickup_p99_ms"]
    assert figures["coordinator_rss_mb"] > 10 and "per_stream_kb" in figures
    assert figures["coordinator_cpu_idle_pct"] >= 0 and figures["coordinator_cpu_load_pct"] > 0
    assert "50 of 50 in" in done.err and "pickup latency" in done.err
