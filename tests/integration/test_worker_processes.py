"""Workers as real processes, with real signals: SIGKILL mid-task loses nothing; SIGTERM
drains; every process has its own default id; a worker without handlers refuses to start
in one line. Checked against the database and the worker app's own log of side effects."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from testsupport import (
    SUPPORT_DIR,
    TEST_LEASE,
    completions,
    eventually,
    spawn_worker,
    stop_process,
    submit,
)

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


async def test_each_worker_process_has_its_own_default_id(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = str(tmp_path / "effects.log")
    workers = [
        spawn_worker(coordinator.address, "worker_app:worker", log, concurrency=2) for _ in range(2)
    ]
    try:
        # Four tasks that each hold a slot: two workers with two slots each share them.
        ids = [(await submit(stub, "sleep", payload=b"1.5")).id for _ in range(4)]
        await eventually(_in_state(db, task_pb2.TASK_STATE_RUNNING, 4), timeout=20)
        running = {r["worker_id"] for r in await db.fetch("SELECT DISTINCT worker_id FROM tasks")}
        await eventually(_in_state(db, task_pb2.TASK_STATE_SUCCEEDED, 4), timeout=20)
        assert sorted(task_id for task_id, _ in completions(log)) == sorted(ids)
        # hostname-pid-random, one per process: no two processes share an id.
        host = re.escape(socket.gethostname())
        expected = {re.compile(rf"^{host}-{proc.pid}-[0-9a-f]{{6}}$") for proc in workers}
        assert len(running) == 2
        for pattern in expected:
            assert sum(bool(pattern.match(worker_id)) for worker_id in running) == 1, running
    finally:
        for proc in workers:
            stop_process(proc)


def test_worker_without_handlers_refuses_to_start_in_one_line(coordinator: Coordinator) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert "has no task handlers: register at least one with @worker.task('TYPE')" in lines[0]
