"""Fault scenarios with real worker processes, checked by the scenario checker
(tests/support/cluster.py: every acknowledged task committed once and finished by exactly
one committed outcome whose run the worker log shows).

The coordinator runs in-process (its fixtures), so a scenario can also look at what it
knows (evictions) directly; workers are separate processes, frozen and thawed with real
signals.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cluster import Checker, LoadGenerator, WorkerProcess
from testsupport import coordinator_config, eventually

from conveyor.coordinator import Coordinator

pytestmark = pytest.mark.slow


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.close()


async def _count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_a_frozen_worker_is_evicted_and_its_late_results_change_nothing(
    database_dsn: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """A worker frozen mid-task (SIGSTOP: its connection stays open, it says nothing) is
    evicted, its leases taken back at once (the lease itself would last 30 s); its tasks
    run elsewhere; thawed, it finishes them late and reports, and each task still has
    exactly one committed outcome."""
    config = coordinator_config(database_dsn, lease_duration=30.0, liveness_timeout=1.5)
    coordinator = Coordinator(config)
    await coordinator.start()
    try:
        effects = tmp_path / "effects.log"
        frozen = WorkerProcess(
            coordinator.address, effects, log_dir=tmp_path, name="frozen", concurrency=20
        )
        workers.append(frozen.start())
        load = LoadGenerator(
            coordinator.address, count=20, rate=200, task_type="sleep", payload=b"1.5"
        )
        log = await load.wait(timeout=60)
        assert len(log.acknowledged) == 20

        async def all_running() -> bool:
            return await _count(database_dsn, "SELECT count(*) FROM tasks WHERE state = 3") == 20

        await eventually(all_running, timeout=30)
        frozen.pause()
        await eventually(lambda: _evictions(coordinator), timeout=30)
        (eviction,) = coordinator.sessions.evictions
        assert eviction.released == 20 and "no message for" in eviction.reason
        rescuer = WorkerProcess(
            coordinator.address, effects, log_dir=tmp_path, name="rescuer", concurrency=20
        )
        workers.append(rescuer.start())
        report = await Checker(log, effects).report(database_dsn, wait_settled=60)
        assert report.violations == [], "\n".join(report.violations)
        frozen.resume()
        # Thawed, it reconnects (its stream was cut) and learns its leases are gone;
        # whatever it reports for them is refused.
        await eventually(lambda: _connected(coordinator, 2), timeout=30)
        report = await Checker(log, effects).report(database_dsn)
        assert report.violations == [], "\n".join(report.violations)
        assert report.succeeded == 20
    finally:
        await coordinator.stop(grace=1.0)


async def _evictions(coordinator: Coordinator) -> bool:
    return len(coordinator.sessions.evictions) > 0


async def _connected(coordinator: Coordinator, count: int) -> bool:
    return len(coordinator.sessions) >= count


async def test_a_submit_burst_over_the_backlog_limit_loses_nothing(
    database_dsn: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Ten times the backlog limit submitted at once: submits past the limit are refused
    with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, RetryInfo), the load retries them, and every
    acknowledged task completes."""
    coordinator = Coordinator(coordinator_config(database_dsn, max_backlog=30))
    await coordinator.start()
    try:
        effects = tmp_path / "effects.log"
        worker = WorkerProcess(coordinator.address, effects, log_dir=tmp_path, concurrency=10)
        workers.append(worker.start())
        load = LoadGenerator(
            coordinator.address,
            count=300,
            rate=2000,
            task_type="sleep",
            payload=b"0.05",
            give_up_after=120,
        )
        log = await load.wait(timeout=180)
        assert sum(log.errors.values()) > 0, "the burst never met the limit"
        report = await Checker(log, effects).report(database_dsn, wait_settled=120)
        assert report.violations == [], "\n".join(report.violations)
        assert report.succeeded == 300
    finally:
        await coordinator.stop(grace=1.0)
