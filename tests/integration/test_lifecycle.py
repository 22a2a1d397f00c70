"""Every task state, end to end through the client library and the worker SDK in-process:
success, retries into the dead-letter queue and redrive, non-retryable errors, timeouts,
cancellation of a running handler, delayed tasks and sync handlers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.client import (
    AsyncClient,
    AttemptOutcome,
    RetryPolicy,
    TaskCancelledError,
    TaskFailedError,
    TaskState,
)
from conveyor.coordinator import Coordinator
from conveyor.worker import NonRetryableError, TaskContext, Worker

FAST_RETRY = RetryPolicy(initial_backoff=timedelta(milliseconds=50), jitter=0.0)


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(coordinator.address) as c:
        yield c


@pytest.fixture
async def worker(coordinator: Coordinator) -> AsyncIterator[Worker]:
    w = Worker(coordinator.address, concurrency=4, grace_period=2.0)
    flaky_calls: dict[str, int] = {}
    started = asyncio.Event()

    @w.task("add")
    async def add(ctx: TaskContext, payload: dict[str, int]) -> int:
        return payload["a"] + payload["b"]

    @w.task("flaky")
    async def flaky(ctx: TaskContext, payload: int) -> str:
        flaky_calls[ctx.task_id] = flaky_calls.get(ctx.task_id, 0) + 1
        if ctx.attempt < payload:
            raise RuntimeError(f"flake {ctx.attempt}")
        return f"ok after {ctx.attempt}"

    @w.task("always-fails")
    async def always_fails(ctx: TaskContext, payload: Any) -> None:
        raise RuntimeError(f"broken on attempt {ctx.attempt}")

    @w.task("rejects")
    async def rejects(ctx: TaskContext, payload: Any) -> None:
        raise NonRetryableError("payload is unusable")

    @w.task("sleeps")
    async def sleeps(ctx: TaskContext, payload: float) -> str:
        started.set()
        await asyncio.sleep(payload)
        return "woke"

    @w.task("sync-add")
    def sync_add(ctx: TaskContext, payload: dict[str, int]) -> dict[str, Any]:
        return {"sum": payload["a"] + payload["b"], "thread": threading.current_thread().name}

    w.started_event = started  # type: ignore[attr-defined]
    w.flaky_calls = flaky_calls  # type: ignore[attr-defined]
    run = asyncio.create_task(w.run(install_signal_handlers=False))
    await asyncio.wait_for(w.wait_connected(), 10)
    try:
        yield w
    finally:
        w.shutdown(force=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)


async def test_success(client: AsyncClient, worker: Worker) -> None:
    task = await client.submit("add", {"a": 2, "b": 3})
    assert await client.result(task.id, timeout=10) == 5
    done, attempts = await client.get_with_attempts(task.id)
    assert done.state is TaskState.SUCCEEDED and done.attempt == 1
    assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCEEDED]
    assert attempts[0].worker_id == worker.worker_id


async def test_retries_then_succeeds(client: AsyncClient, worker: Worker) -> None:
    task = await client.submit("flaky", 3, max_attempts=5, retry_policy=FAST_RETRY)
    assert await client.result(task.id, timeout=10) == "ok after 3"
    _, attempts = await client.get_with_attempts(task.id)
    assert [a.outcome for a in attempts] == [
        AttemptOutcome.FAILED,
        AttemptOutcome.FAILED,
        AttemptOutcome.SUCCEEDED,
    ]
    assert attempts[0].error is not None and "flake 1" in attempts[0].error


async def test_exhausted_retries_dead_letter_then_redrive(
    client: AsyncClient, worker: Worker
) -> None:
    task = await client.submit("always-fails", None, max_attempts=2, retry_policy=FAST_RETRY)
    with pytest.raises(TaskFailedError) as caught:
        await client.result(task.id, timeout=10)
    assert caught.value.task.state is TaskState.DEAD
    assert "broken on attempt 2" in (caught.value.task.last_error or "")
    dead = await client.list(state=TaskState.DEAD)
    assert [t.id for t in dead] == [task.id]
    redriven = await client.retry(task.id)
    assert redriven.state is TaskState.PENDING
    final = await client.wait(task.id, timeout=10)
    # A redrive gets a fresh budget: two more attempts (3 and 4), both failing.
    assert final.state is TaskState.DEAD and final.attempt == 4


async def test_non_retryable_error_dead_letters_at_once(
    client: AsyncClient, worker: Worker
) -> None:
    task = await client.submit("rejects", None, max_attempts=5)
    final = await client.wait(task.id, timeout=10)
    assert final.state is TaskState.DEAD and final.attempt == 1
    assert "payload is unusable" in (final.last_error or "")


async def test_timeout_stops_the_handler(client: AsyncClient, worker: Worker) -> None:
    task = await client.submit("sleeps", 30, timeout=0.3, max_attempts=1)
    started = time.monotonic()
    final = await client.wait(task.id, timeout=10)
    assert time.monotonic() - started < 5
    assert final.state is TaskState.DEAD
    _, attempts = await client.get_with_attempts(task.id)
    assert [a.outcome for a in attempts] == [AttemptOutcome.TIMED_OUT]


async def test_cancel_running_stops_the_handler(client: AsyncClient, worker: Worker) -> None:
    task = await client.submit("sleeps", 30)
    await asyncio.wait_for(worker.started_event.wait(), 10)  # type: ignore[attr-defined]
    cancelled = await client.cancel(task.id)
    assert cancelled.state is TaskState.CANCELLED
    with pytest.raises(TaskCancelledError):
        await client.result(task.id, timeout=5)
    _, attempts = await client.get_with_attempts(task.id)
    assert [a.outcome for a in attempts] == [AttemptOutcome.CANCELLED]
    # The worker's slot comes back: a new task still runs.
    follow_up = await client.submit("add", {"a": 1, "b": 1})
    assert await client.result(follow_up.id, timeout=10) == 2


async def test_delayed_task_runs_after_its_time(client: AsyncClient, worker: Worker) -> None:
    asked = datetime.now(UTC)
    task = await client.submit("add", {"a": 1, "b": 2}, run_at=timedelta(seconds=0.8))
    assert task.state is TaskState.SCHEDULED
    # The client turns the delay into an instant before sending; the coordinator's
    # create_time comes later by the request's transit, so the attempt is measured against
    # the instant asked for, not against create_time.
    assert task.run_at is not None and task.run_at - asked >= timedelta(seconds=0.8)
    assert await client.result(task.id, timeout=10) == 3
    _, attempts = await client.get_with_attempts(task.id)
    assert [a.start_time is not None and a.start_time >= task.run_at for a in attempts] == [True]


async def test_sync_handler_runs_in_a_thread(client: AsyncClient, worker: Worker) -> None:
    task = await client.submit("sync-add", {"a": 20, "b": 22})
    result = await client.result(task.id, timeout=10)
    assert result["sum"] == 42
    assert result["thread"] != threading.main_thread().name


async def test_idempotent_submit_through_the_client(client: AsyncClient, worker: Worker) -> None:
    first = await client.submit("add", {"a": 1, "b": 1}, idempotency_key="once")
    again = await client.submit("add", {"a": 1, "b": 1}, idempotency_key="once")
    assert again.id == first.id
    assert await client.result(first.id, timeout=10) == 2


async def test_80_one_mib_tasks_run_on_a_worker_with_100_slots(coordinator: Coordinator) -> None:
    """All 80 ended DEAD without running: the worker's first claim took all 80 into one
    message over the limit, the stream died, and each reconnect used an attempt (issue 7.1)."""
    payload = "x" * ((1 << 20) - 16)
    async with AsyncClient(coordinator.address) as client:
        tasks = [await client.submit("big", payload) for _ in range(80)]
        worker = Worker(coordinator.address, concurrency=100, grace_period=2.0)
        ran: set[str] = set()

        @worker.task("big")
        async def big(ctx: TaskContext, payload: str) -> int:
            ran.add(ctx.task_id)
            return len(payload)

        run = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            results = [await client.result(t.id, timeout=60) for t in tasks]
        finally:
            worker.shutdown(force=True)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(run, 10)
    assert results == [len(payload)] * 80
    assert ran == {t.id for t in tasks}
