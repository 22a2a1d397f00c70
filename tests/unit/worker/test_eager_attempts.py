"""A handler that cannot suspend runs to its end when its attempt starts, without a task.

What it must see is a task's: its context a copy of the one its attempt started in, its
exceptions mapped to results, and a slot freed in it starting the next attempt (as a
task, not by recursion). Handlers that can suspend still run in their own task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker import NonRetryableError, TaskContext
from conveyor.worker._registry import TaskRegistry, _never_suspends
from conveyor.worker._runtime import Runtime

_caller_var: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="unset")


async def _noop(ctx: TaskContext, payload: bytes) -> bytes:
    return b""


async def _sleeps(ctx: TaskContext, payload: bytes) -> bytes:
    await asyncio.sleep(0)
    return b""


async def _with_a_timeout(ctx: TaskContext, payload: bytes) -> None:
    async with asyncio.timeout(1):
        await asyncio.sleep(0)


async def _iterates(ctx: TaskContext, payload: Any) -> None:
    async for _ in payload:
        pass


async def _awaits_in_a_comprehension(ctx: TaskContext, payload: Any) -> list[Any]:
    return [await x for x in payload]


async def _calls_without_awaiting(ctx: TaskContext, payload: bytes) -> bytes:
    return bytes(reversed(payload))


def _sync(ctx: TaskContext, payload: bytes) -> bytes:
    return payload


class _AsyncCallable:
    async def __call__(self, ctx: TaskContext, payload: bytes) -> bytes:
        return payload


def test_only_async_functions_without_await_never_suspend() -> None:
    assert _never_suspends(_noop)
    assert _never_suspends(_calls_without_awaiting)
    for func in (_sleeps, _with_a_timeout, _iterates, _awaits_in_a_comprehension):
        assert not _never_suspends(func), func.__name__
    # Not judged: a sync handler, a partial and a callable object count as suspending.
    assert not _never_suspends(_sync)
    assert not _never_suspends(functools.partial(_noop))
    assert not _never_suspends(_AsyncCallable())
    registry = TaskRegistry()
    assert registry.register("a", _noop).never_suspends
    assert not registry.register("b", _sleeps).never_suspends


class _Listener:
    def results_ready(self) -> None:
        pass

    def slots_changed(self) -> None:
        pass


@pytest.fixture
async def executor() -> AsyncIterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=False)


def _runtime(
    registry: TaskRegistry, executor: concurrent.futures.Executor, concurrency: int = 4
) -> Runtime:
    runtime = Runtime(registry, concurrency=concurrency, executor=executor, worker_id="w")
    runtime.attach(_Listener())
    return runtime


def _assignment(task_id: str, task_type: str, *, timeout: float | None = None) -> pb.Assignment:
    message = pb.Assignment(
        lease=pb.Lease(task_id=task_id, attempt=1, epoch=3),
        queue="q",
        type=task_type,
        payload=b"payload",
        content_type="application/octet-stream",
    )
    if timeout is not None:
        message.timeout.seconds = int(timeout)
    return message


def _sent(runtime: Runtime) -> dict[str, pb.TaskResult]:
    request = pb.ConnectRequest()
    runtime.pending.take_batch(request.results.results, 100, 1 << 20, 256)
    return {r.lease.task_id: r for r in request.results.results}


async def test_a_handler_without_await_ends_before_its_attempt_starts_returns(
    executor: concurrent.futures.Executor,
) -> None:
    registry = TaskRegistry()
    seen: dict[str, Any] = {}

    @functools.partial(registry.register, "look", raw=True)
    async def look(ctx: TaskContext, payload: bytes) -> bytes:
        seen["task"] = asyncio.current_task()
        seen["caller_var"] = _caller_var.get()
        _caller_var.set("set by the handler")
        seen["task_id"] = ctx.task_id
        seen["deadline"] = ctx.deadline
        return payload.upper()

    runtime = _runtime(registry, executor)
    caller = asyncio.current_task()
    _caller_var.set("the caller's")
    runtime.accept(_assignment("t1", "look", timeout=30))
    # Ended already: no turn of the loop was needed, and no task made for it.
    assert runtime.running_count() == 0 and runtime.busy_slots() == 0
    assert runtime.free_slots() == 4
    result = _sent(runtime)["t1"]
    assert (result.outcome, result.result) == (pb.TASK_OUTCOME_SUCCEEDED, b"PAYLOAD")
    # Outside any task (not the caller's: a handler must not be able to cancel it), with
    # a copy of the caller's context, as a task's; its deadline set as for any attempt.
    assert seen["task"] is None
    assert seen["caller_var"] == "the caller's"
    assert _caller_var.get() == "the caller's"
    assert seen["task_id"] == "t1" and seen["deadline"] is not None
    assert asyncio.current_task() is caller


async def test_exceptions_of_an_eager_handler_are_its_attempt_s_results(
    executor: concurrent.futures.Executor,
) -> None:
    registry = TaskRegistry()

    @functools.partial(registry.register, "boom", raw=True)
    async def boom(ctx: TaskContext, payload: bytes) -> bytes:
        raise ValueError("boom")

    @functools.partial(registry.register, "final", raw=True)
    async def final(ctx: TaskContext, payload: bytes) -> bytes:
        raise NonRetryableError("no")

    @functools.partial(registry.register, "cancelled", raw=True)
    async def cancelled(ctx: TaskContext, payload: bytes) -> bytes:
        raise asyncio.CancelledError

    runtime = _runtime(registry, executor)
    for task_type in ("boom", "final", "cancelled"):
        runtime.accept(_assignment(task_type, task_type))
    results = _sent(runtime)
    assert runtime.running_count() == 0
    assert (results["boom"].outcome, results["boom"].retryable) == (pb.TASK_OUTCOME_FAILED, True)
    assert "ValueError: boom" in results["boom"].error
    assert (results["final"].outcome, results["final"].retryable) == (
        pb.TASK_OUTCOME_FAILED,
        False,
    )
    assert results["cancelled"].error == "CancelledError raised by the handler"


async def test_a_handler_that_awaits_still_runs_in_its_own_task(
    executor: concurrent.futures.Executor,
) -> None:
    registry = TaskRegistry()
    tasks: list[asyncio.Task[Any] | None] = []

    @functools.partial(registry.register, "waits", raw=True)
    async def waits(ctx: TaskContext, payload: bytes) -> bytes:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(0)
        return b""

    runtime = _runtime(registry, executor)
    runtime.accept(_assignment("t1", "waits"))
    assert runtime.running_count() == 1 and not tasks  # not started yet: a task's turn
    await runtime.wait_idle()
    (task,) = tasks
    assert task is not None and task is not asyncio.current_task()
    assert task.get_name() == "conveyor-task"
    assert _sent(runtime)["t1"].outcome == pb.TASK_OUTCOME_SUCCEEDED


async def test_a_slot_freed_by_an_eager_attempt_starts_the_next_in_a_task(
    executor: concurrent.futures.Executor, caplog: pytest.LogCaptureFixture
) -> None:
    registry = TaskRegistry()
    depth = 0
    deepest = 0
    in_task: list[bool] = []

    @functools.partial(registry.register, "quick", raw=True)
    async def quick(ctx: TaskContext, payload: bytes) -> bytes:
        nonlocal depth, deepest
        depth += 1
        deepest = max(deepest, depth)
        in_task.append(asyncio.current_task() is not None)
        depth -= 1
        return b""

    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    runtime = _runtime(registry, executor, concurrency=1)
    blocker = asyncio.Event()

    @functools.partial(registry.register, "hold", raw=True)
    async def hold(ctx: TaskContext, payload: bytes) -> bytes:
        await blocker.wait()
        return b""

    runtime.accept(_assignment("held", "hold"))
    # Beyond the one slot (an oversending coordinator): 50 wait in the backlog.
    for i in range(50):
        runtime.accept(_assignment(f"q{i}", "quick"))
    blocker.set()
    await runtime.wait_idle()
    assert len(_sent(runtime)) == 51
    # A slot freed in a task starts the next attempt at once (outside a task); one freed
    # inside an eager run starts it as a task, never nested in the run that freed it.
    assert deepest == 1
    assert in_task[:4] == [False, True, False, True]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_message_s_assignments_run_outside_the_caller_s_task_and_return_to_it(
    executor: concurrent.futures.Executor,
) -> None:
    registry = TaskRegistry()
    seen: list[asyncio.Task[Any] | None] = []

    @functools.partial(registry.register, "look", raw=True)
    async def look(ctx: TaskContext, payload: bytes) -> bytes:
        seen.append(asyncio.current_task())
        return b""

    @functools.partial(registry.register, "bad", raw=True)
    async def bad(ctx: TaskContext, payload: bytes) -> bytes:
        raise KeyboardInterrupt  # not an attempt's failure: it ends the loop, as in a task

    runtime = _runtime(registry, executor)
    caller = asyncio.current_task()
    runtime.accept_all([_assignment("t1", "look"), _assignment("t2", "look")])
    assert seen == [None, None]
    assert asyncio.current_task() is caller
    assert set(_sent(runtime)) == {"t1", "t2"}
    with pytest.raises(KeyboardInterrupt):
        runtime.accept_all([_assignment("t3", "bad")])
    # Back in its own task even so; and the shutdown that follows reports the attempt
    # the exception left undecided as interrupted.
    assert asyncio.current_task() is caller
    runtime.stop_all()
    assert _sent(runtime)["t3"].outcome == pb.TASK_OUTCOME_INTERRUPTED


async def _changes_later(ctx: TaskContext, payload: bytes) -> bytes:
    return b""


async def test_a_handler_that_suspends_after_all_fails_instead_of_hanging(
    executor: concurrent.futures.Executor, caplog: pytest.LogCaptureFixture
) -> None:
    registry = TaskRegistry()
    registry.register("odd", _changes_later, raw=True)
    original = _changes_later.__code__
    # Its code swapped after it was judged: it now awaits.
    _changes_later.__code__ = _sleeps.__code__
    try:
        runtime = _runtime(registry, executor)
        runtime.accept(_assignment("t1", "odd"))
    finally:
        _changes_later.__code__ = original
    assert runtime.running_count() == 0 and runtime.busy_slots() == 0
    result = _sent(runtime)["t1"]
    assert (result.outcome, result.retryable) == (pb.TASK_OUTCOME_FAILED, True)
    assert any("suspended though it has no await" in r.getMessage() for r in caplog.records)
