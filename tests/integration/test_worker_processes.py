"""Workers as real processes, with real signals: SIGKILL mid-task loses nothing; SIGTERM
drains; every process has its own default id; a worker without handlers refuses to start
in one line. Checked against the database and the worker app's own log of side effects."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import asyncpg
import pytest
from cluster import WorkerProcess, read_effects, read_starts
from processes import run
from testsupport import SUPPORT_DIR, TEST_LEASE, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.v1 import task_pb2, task_service_pb2_grpc

# The aio stub type (type-checking only: the generated module has no such class at run time).
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"


def _worker(
    coordinator: Coordinator, tmp_path: Path, *, concurrency: int, grace: float = 10.0
) -> WorkerProcess:
    """``conveyor worker worker_app:worker`` as its own process, started; its completed
    handler runs appended to ``tmp_path/effects.log``."""
    return WorkerProcess(
        coordinator.address,
        tmp_path / "effects.log",
        log_dir=tmp_path,
        concurrency=concurrency,
        grace=grace,
    ).start()


def _in_state(db: asyncpg.Connection, state: int, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        found: int = await db.fetchval("SELECT count(*) FROM tasks WHERE state = $1", state)
        return found == count

    return check


@pytest.mark.slow
async def test_sigkilled_worker_loses_nothing(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    victim = _worker(coordinator, tmp_path, concurrency=10)
    rescuer = None
    try:
        ids = [(await submit(stub, "hold-first-attempt")).id for _ in range(10)]
        # All ten are running in the victim (its first attempts hang).
        await eventually(_in_state(db, task_pb2.TASK_STATE_RUNNING, 10), timeout=20)
        victim_id = await db.fetchval("SELECT DISTINCT worker_id FROM tasks WHERE state = 3")
        assert victim.kill() == -signal.SIGKILL
        rescuer = _worker(coordinator, tmp_path, concurrency=10)
        await eventually(
            _in_state(db, task_pb2.TASK_STATE_SUCCEEDED, 10), timeout=TEST_LEASE * 10 + 20
        )
        # Every task completed exactly once, on its second attempt, on the rescuer.
        done = read_effects(victim.effects_log)
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
        victim.close()
        if rescuer is not None:
            rescuer.close()


@pytest.mark.slow
async def test_sigterm_drains_in_flight_work_and_exits_zero(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    worker = _worker(coordinator, tmp_path, concurrency=5, grace=20)
    try:
        running = [(await submit(stub, "sleep", payload=b"1.5")).id for _ in range(5)]
        # Running in the worker, not only leased to it: an assignment still on its way
        # when the drain begins goes back unstarted, and rightly so.
        await eventually(
            lambda: len(read_starts(worker.effects_log)) == 5,
            timeout=20,
            what="five handlers to start",
        )
        worker.signal(signal.SIGTERM)
        # Submitted after the signal: a draining worker must not take these.
        late = [(await submit(stub, "sleep", payload=b"0")).id for _ in range(3)]
        assert await worker.wait_exit(30) == 0
        states = dict(await db.fetch("SELECT id::text, state FROM tasks"))
        assert all(states[i] == task_pb2.TASK_STATE_SUCCEEDED for i in running)
        assert all(states[i] == task_pb2.TASK_STATE_PENDING for i in late)
        assert sorted(task_id for task_id, _ in read_effects(worker.effects_log)) == sorted(running)
    finally:
        worker.close()


async def test_each_worker_process_has_its_own_default_id(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    workers = [_worker(coordinator, tmp_path, concurrency=2) for _ in range(2)]
    try:
        # Four tasks that each hold a slot: two workers with two slots each share them.
        ids = [(await submit(stub, "sleep", payload=b"1.5")).id for _ in range(4)]
        await eventually(_in_state(db, task_pb2.TASK_STATE_RUNNING, 4), timeout=20)
        running = {r["worker_id"] for r in await db.fetch("SELECT DISTINCT worker_id FROM tasks")}
        await eventually(_in_state(db, task_pb2.TASK_STATE_SUCCEEDED, 4), timeout=20)
        assert sorted(task_id for task_id, _ in read_effects(tmp_path / "effects.log")) == sorted(
            ids
        )
        # hostname-pid-random, one per process: no two processes share an id.
        host = re.escape(socket.gethostname())
        expected = {re.compile(rf"^{host}-{worker.pid}-[0-9a-f]{{6}}$") for worker in workers}
        assert len(running) == 2
        for pattern in expected:
            assert sum(bool(pattern.match(worker_id)) for worker_id in running) == 1, running
    finally:
        for worker in workers:
            worker.close()


async def test_worker_without_handlers_refuses_to_start_in_one_line(
    coordinator: Coordinator,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    done = await run(
        [
            sys.executable,
            "-m",
            "conveyor.cli.main",
            "--coordinator",
            coordinator.address,
            "worker",
            "worker_app:idle",
        ],
        env=env,
    )
    assert done.code != 0
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert len(lines) == 1, done.err  # one line, no traceback
    assert "has no task handlers: register at least one with @worker.task('TYPE')" in lines[0]
