"""SDK behaviour that needs the coordinator's side of issues 7 and 9, end to end: unserved
tasks, interrupted attempts, worker id conflicts and the backlog limit, against the real
coordinator (the SDK's mapping logic is unit-tested against fake servicers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import processes
import pytest
from testsupport import SUPPORT_DIR, coordinator_config, eventually

from conveyor.client import (
    AsyncClient,
    AttemptOutcome,
    QuotaExceededError,
    Task,
    TaskState,
    WaitTimeoutError,
)
from conveyor.coordinator import Coordinator
from conveyor.worker import TaskContext, Worker


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(coordinator.address) as c:
        yield c


async def test_waiting_on_a_type_nobody_serves_says_so(client: AsyncClient) -> None:
    task = await client.submit("nobody-serves-this", {"n": 1}, queue="lonely")
    assert (await client.get(task.id)).unserved
    with pytest.raises(WaitTimeoutError) as caught:
        await client.result(task.id, timeout=0.5)
    assert "no connected worker serves type 'nobody-serves-this' on queue 'lonely'" in str(
        caught.value
    )


@contextlib.asynccontextmanager
async def _running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Runs the worker until the block ends (then stops it at once); yields its run."""
    run = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        async with asyncio.timeout(10):
            await worker.wait_connected()
        yield run
    finally:
        worker.shutdown(force=True)
        with contextlib.suppress(BaseException):
            await run


async def _started(client: AsyncClient, started: asyncio.Event) -> Task:
    """Submits a task of type "long" (one attempt); returns it once its handler started."""
    task = await client.submit("long", None, max_attempts=1)
    async with asyncio.timeout(10):
        await started.wait()
    return task


async def test_end_of_grace_period_interrupts_without_using_an_attempt(
    coordinator: Coordinator, client: AsyncClient
) -> None:
    worker = Worker(coordinator.address, grace_period=0.2)
    started = asyncio.Event()

    @worker.task("long")
    async def long(ctx: TaskContext, payload: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    async with _running(worker) as run:
        task = await _started(client, started)
        worker.shutdown()
        async with asyncio.timeout(10):
            await run

        async def settled() -> Any:
            current, attempts = await client.get_with_attempts(task.id)
            return (current, attempts) if current.state is not TaskState.RUNNING else None

        current, attempts = await eventually(settled)
        assert attempts[0].outcome is AttemptOutcome.INTERRUPTED
        # Ready again at once, with its one attempt still to use.
        assert current.state is TaskState.PENDING
        assert current.attempts_counted == 0 and current.uncounted_attempts == 1


async def test_a_running_task_survives_its_workers_reconnect(
    coordinator: Coordinator, client: AsyncClient
) -> None:
    """The SDK presents its resume token when it reconnects, so the coordinator knows the
    leases it lists are its own: the running attempt is kept, not run again."""
    worker = Worker(coordinator.address)
    started, finish = asyncio.Event(), asyncio.Event()

    @worker.task("long")
    async def long(ctx: TaskContext, payload: Any) -> str:
        started.set()
        await finish.wait()
        return "done"

    async with _running(worker):
        task = await _started(client, started)
        first = coordinator.sessions.by_worker("default", worker.worker_id)
        assert first is not None
        first.end("cut by the test")

        def reconnected() -> bool:
            session = coordinator.sessions.by_worker("default", worker.worker_id)
            return session is not None and session is not first

        await eventually(reconnected, what="the worker's next session")
        finish.set()
        assert await client.result(task.id, timeout=10) == "done"
        current, attempts = await client.get_with_attempts(task.id)
        assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCEEDED]
        assert current.attempt == 1


async def test_second_process_with_the_same_worker_id_is_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    first = Worker(coordinator.address, worker_id="same-id")
    first.register("noop", lambda ctx, payload: None)
    run = asyncio.create_task(first.run(install_signal_handlers=False))
    try:
        async with asyncio.timeout(10):
            await first.wait_connected()
        # Another process (another pid) with the same id, while the first is live.
        env = {
            **os.environ,
            "CONVEYOR_TEST_WORKER_ID": "same-id",
            "CONVEYOR_TEST_LOG": str(tmp_path / "effects.log"),
            "PYTHONPATH": os.pathsep.join([str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        second = await processes.run(
            [
                *(sys.executable, "-m", "conveyor.cli.main", "--coordinator", coordinator.address),
                *("worker", "worker_app:worker"),
            ],
            env=env,
            timeout=10,
        )
        assert second.code == 1
        # Said once, in one line.
        (said,) = [line for line in second.err.splitlines() if "in use" in line]
        assert "worker id 'same-id' is in use by a live worker session" in said
    finally:
        first.shutdown(force=True)
        with contextlib.suppress(BaseException):
            await run


async def test_backlog_quota_is_raised_or_waited_out(database_dsn: str) -> None:
    coordinator = Coordinator(coordinator_config(database_dsn, max_backlog=3))
    await coordinator.start()
    worker = Worker(coordinator.address)
    worker.register("echo", lambda ctx, payload: payload)
    run: asyncio.Task[None] | None = None
    try:
        async with AsyncClient(coordinator.address, retry_resource_exhausted=False) as client:
            for _ in range(3):
                await client.submit("echo", None)
            with pytest.raises(QuotaExceededError) as caught:
                await client.submit("echo", None)
        assert [subject for subject, _ in caught.value.violations] == ["max_backlog"]
        assert caught.value.retry_after is not None and caught.value.retry_after > 0

        async with AsyncClient(
            coordinator.address, timeout=30, retry_resource_exhausted=True
        ) as client:
            # Refused until a worker works the backlog off; the client waits per RetryInfo.
            pending = asyncio.create_task(client.submit("echo", "late"))
            run = asyncio.create_task(worker.run(install_signal_handlers=False))
            task = await pending
            assert await client.result(task.id, timeout=20) == "late"
    finally:
        worker.shutdown(force=True)
        if run is not None:
            with contextlib.suppress(BaseException):
                await run
        await coordinator.stop(grace=1.0)
