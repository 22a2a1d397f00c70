"""Workers as real processes, with real signals: SIGKILL mid-task loses nothing; SIGTERM
drains. Checked against the database and the worker app's own log of side effects."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from testsupport import TEST_LEASE, completions, eventually, spawn_worker, stop_process, submit

from conveyor.coordinator import Coordinator
from conveyor.v1 import task_pb2, task_service_pb2_grpc

Stub = task_service_pb2_grpc.TaskServiceStub


def _in_state(db: asyncpg.Connection, state: int, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await db.fetchval("SELECT count(*) FROM tasks WHERE state = $1", state) == count

    return check


@pytest.mark.slow
async def test_sigkilled_worker_loses_nothing(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = str(tmp_path / "effects.log")
    victim = spawn_worker(coordinator.address, "worker_app:worker", log, concurrency=10)
    rescuer = None
    try:
        ids = [(await submit(stub, "hold-first-attempt")).id for _ in range(10)]
        # All ten are running in the victim (its first attempts hang).
        await eventually(_in_state(db, task_pb2.TASK_STATE_RUNNING, 10), timeout=20)
        victim_id = await db.fetchval("SELECT DISTINCT worker_id FROM tasks WHERE state = 3")
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        rescuer = spawn_worker(coordinator.address, "worker_app:worker", log, concurrency=10)
        await eventually(
            _in_state(db, task_pb2.TASK_STATE_SUCCEEDED, 10), timeout=TEST_LEASE * 10 + 20
        )
        # Every task completed exactly once, on its second attempt, on the rescuer.
        done = completions(log)
        assert Counter(task_id for task_id, _ in done) == Counter(ids)
        assert {attempt for _, attempt in done} == {2}
        attempts = await db.fetch(
            "SELECT task_id::text, attempt, worker_id, outcome FROM task_attempts"
        )
        by_task: dict[str, list[tuple[int, str, int]]] = {}
        for row in attempts:
            by_task.setdefault(row["task_id"], []).append(
                (row["attempt"], row["worker_id"], row["outcome"])
            )
        assert set(by_task) == set(ids)
        for history in by_task.values():
            history.sort()
            assert [(a, o) for a, _, o in history] == [
                (1, task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED),
                (2, task_pb2.ATTEMPT_OUTCOME_SUCCEEDED),
            ]
            assert history[0][1] == victim_id
            assert history[1][1] != victim_id
    finally:
        stop_process(victim)
        if rescuer is not None:
            stop_process(rescuer)


@pytest.mark.slow
async def test_sigterm_drains_in_flight_work_and_exits_zero(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = str(tmp_path / "effects.log")
    worker = spawn_worker(coordinator.address, "worker_app:worker", log, concurrency=5, grace=20)
    try:
        running = [(await submit(stub, "sleep", payload=b"1.5")).id for _ in range(5)]
        await eventually(_in_state(db, task_pb2.TASK_STATE_RUNNING, 5), timeout=20)
        worker.send_signal(signal.SIGTERM)
        # Submitted after the signal: a draining worker must not take these.
        late = [(await submit(stub, "sleep", payload=b"0")).id for _ in range(3)]
        code = await asyncio.to_thread(worker.wait, 30)
        assert code == 0
        states = dict(await db.fetch("SELECT id::text, state FROM tasks"))
        assert all(states[i] == task_pb2.TASK_STATE_SUCCEEDED for i in running)
        assert all(states[i] == task_pb2.TASK_STATE_PENDING for i in late)
        assert sorted(task_id for task_id, _ in completions(log)) == sorted(running)
    finally:
        stop_process(worker)
