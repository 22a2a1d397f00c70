"""``conveyor bench-floor`` sends probes through a bare relay to a worker's stream, with
and without a commit, by unary calls or on a stream, and prints its figures (smoke runs:
no timing asserted)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("commit", "stream"), [(False, False), (True, False), (True, True)])
async def test_bench_floor_delivers_every_probe_and_prints_its_figures(
    database_dsn: str, commit: bool, stream: bool
) -> None:
    extra = (("--commit", "--dsn", database_dsn) if commit else ()) + (
        ("--stream",) if stream else ()
    )
    done = await conveyor(
        "bench-floor", "--rate", "40", "--seconds", "0.5", *extra, "--json", timeout=120
    )
    assert done.code == 0, done.err
    figures = json.loads(done.out.strip().splitlines()[-1])
    assert figures["commit"] is commit and figures["stream"] is stream
    # Every probe reached the worker (the run fails when one is missing).
    assert figures["pickup_samples"] == 20
    assert sum(figures["pickup_histogram_ms"].values()) == 20
    assert 0 < figures["pickup_p50_ms"] <= figures["pickup_p99_ms"]
    groups = set(figures["cpu_per_probe_us"])
    assert {"relay", "workers", "client", "total"} <= groups
    assert ("postgres" in groups) is commit
    assert "floor with" in done.err and "pickup histogram" in done.err
