"""Worker SDK pieces that need no server: loader, registry, context, codec, backoff."""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from conveyor.worker import (
    NonRetryableError,
    TaskContext,
    Worker,
    WorkerLoadError,
    load_worker,
)
from conveyor.worker import demo as demo_module
from conveyor.worker._codec import MAX_ERROR_CHARS, describe_exception
from conveyor.worker._connection import BACKOFF_INITIAL, BACKOFF_MAX, backoff_delay
from conveyor.worker._registry import TaskRegistry
from conveyor.worker._session import not_leader_address


def make_context(deadline: float | None = None) -> TaskContext:
    return TaskContext(
        task_id="t",
        type="x",
        queue="default",
        attempt=1,
        max_attempts=3,
        idempotency_key="",
        deadline=deadline,
        labels={},
    )


# -- Worker configuration --------------------------------------------------------------------


def test_worker_defaults_and_addresses() -> None:
    worker = Worker()
    assert worker.coordinators == ("127.0.0.1:50051",)
    assert worker.queues == ("default",)
    assert worker.concurrency == 10
    assert worker.grace_period == 30.0
    assert uuid.UUID(worker.worker_id).version == 4
    assert Worker().worker_id != worker.worker_id  # one id per worker object
    assert Worker("a:1, b:2").coordinators == ("a:1", "b:2")
    assert Worker(["a:1", "b:2"], queues="emails").queues == ("emails",)
    assert Worker(worker_id="fixed").worker_id == "fixed"
    assert not worker.running


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coordinators": ""},
        {"coordinators": []},
        {"queues": []},
        {"queues": [""]},
        {"concurrency": 0},
        {"grace_period": -1},
        {"sync_threads": 0},
    ],
)
def test_worker_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Worker(**kwargs)


def test_task_decorator_returns_the_function_and_rejects_duplicates() -> None:
    worker = Worker()

    @worker.task("a")
    async def a(ctx: TaskContext, payload: Any) -> int:
        return 1

    assert inspect.iscoroutinefunction(a)
    assert worker.task_types == ("a",)
    with pytest.raises(ValueError, match="already has a handler"):
        worker.register("a", lambda ctx, payload: None)
    with pytest.raises(ValueError, match="non-empty"):
        worker.register("", lambda ctx, payload: None)
    with pytest.raises(TypeError):
        worker.register("b", "not callable")  # type: ignore[arg-type]


def test_registry_detects_async_callables() -> None:
    async def async_fn(ctx: TaskContext, payload: Any, extra: int) -> None:
        return None

    class AsyncCallable:
        async def __call__(self, ctx: TaskContext, payload: Any) -> None:
            return None

    registry = TaskRegistry()
    assert registry.register("partial", functools.partial(async_fn, extra=1)).is_async
    assert registry.register("object", AsyncCallable()).is_async
    assert not registry.register("sync", lambda ctx, payload: None).is_async
    registry.freeze()
    with pytest.raises(RuntimeError, match="already running"):
        registry.register("late", lambda ctx, payload: None)


def test_configure_overrides_settings() -> None:
    worker = Worker("a:1", concurrency=2)
    assert worker.configure(coordinators="b:2,c:3", concurrency=7, grace_period=1) is worker
    assert worker.coordinators == ("b:2", "c:3")
    assert (worker.concurrency, worker.grace_period, worker.queues) == (7, 1, ("default",))
    worker.configure(queues=["x"], worker_id="w")
    assert (worker.queues, worker.worker_id) == (("x",), "w")
    with pytest.raises(ValueError):
        worker.configure(concurrency=0)
    assert worker.concurrency == 7


async def test_shutdown_before_run_is_a_noop() -> None:
    Worker().shutdown()


# -- TaskContext ---------------------------------------------------------------------------


async def test_context_cancellation_signal() -> None:
    ctx = make_context(deadline=time.monotonic() + 60)
    assert not ctx.is_cancelled() and ctx.cancelled.reason == ""
    remaining = ctx.time_remaining()
    assert remaining is not None and 59 < remaining <= 60
    assert make_context().time_remaining() is None
    assert make_context(deadline=time.monotonic() - 1).time_remaining() == 0.0

    waiter = asyncio.create_task(ctx.cancelled.wait())
    ctx.cancelled._set("timed out")
    async with asyncio.timeout(1):
        await waiter
    assert ctx.is_cancelled() and ctx.cancelled.reason == "timed out"
    assert ctx.cancelled.wait_sync(0)
    with pytest.raises(AttributeError):
        ctx.task_id = "other"  # type: ignore[misc]


# -- error text ------------------------------------------------------------------------------


def test_describe_exception_caps_long_tracebacks() -> None:
    try:
        raise ValueError("deep " + "y" * 3 * MAX_ERROR_CHARS + " end")
    except ValueError as exc:
        text = describe_exception(exc)
    assert len(text) <= MAX_ERROR_CHARS
    assert text.startswith("ValueError: deep yyy")
    assert "[... truncated ...]" in text
    # The tail, where the traceback ends, is kept.
    assert text.rstrip().endswith("y end")
    assert describe_exception(NonRetryableError("x"), with_traceback=False) == (
        "NonRetryableError: x"
    )


# -- reconnect policy --------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    first = [backoff_delay(0, rng=rng) for _ in range(50)]
    assert all(BACKOFF_INITIAL / 2 <= d <= BACKOFF_INITIAL for d in first)
    assert len(set(first)) > 1  # jittered
    assert all(0.2 <= backoff_delay(2, rng=rng) <= 0.4 for _ in range(50))
    assert all(BACKOFF_MAX / 2 <= backoff_delay(n, rng=rng) <= BACKOFF_MAX for n in (6, 50, 10**6))


class _FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, status: status_pb2.Status | None) -> None:
        trailing = (
            grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
            if status is not None
            else grpc.aio.Metadata()
        )
        super().__init__(code, grpc.aio.Metadata(), trailing, details="x")


def test_not_leader_address_reads_error_info() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="NOT_LEADER", domain="conveyor.dev", metadata={"leader_address": "10.0.0.2:50051"}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, details=[detail])
    assert not_leader_address(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, status)) == (
        "10.0.0.2:50051"
    )
    assert not_leader_address(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, None)) is None
    assert not_leader_address(_FakeRpcError(grpc.StatusCode.INTERNAL, status)) is None


# -- load_worker ---------------------------------------------------------------------------


def test_load_worker_finds_objects_and_factories() -> None:
    assert load_worker("conveyor.worker.demo") is demo_module.worker
    assert load_worker("conveyor.worker.demo:worker") is demo_module.worker
    made = load_worker("conveyor.worker.demo:create_worker")
    assert isinstance(made, Worker) and made is not demo_module.worker
    assert set(made.task_types) == {"echo", "sleep", "fail"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "invalid worker spec"),
        ("a:b:c", "invalid worker spec"),
        ("conveyor_no_such_module_xyz", "no module named 'conveyor_no_such_module_xyz'"),
        ("conveyor.worker.demo:missing", "has no attribute 'missing'"),
        ("conveyor.worker.demo:DEMO_TASK_TYPES", "is a tuple, not a conveyor.worker.Worker"),
        ("conveyor.worker.demo:register_demo_tasks", "worker factory"),
    ],
)
def test_load_worker_errors_name_what_is_missing(spec: str, message: str) -> None:
    with pytest.raises(WorkerLoadError, match=message):
        load_worker(spec)


def test_load_worker_reports_missing_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conveyor_app_with_bad_dep.py").write_text(
        "import conveyor_missing_dependency_xyz\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(WorkerLoadError, match="imports 'conveyor_missing_dependency_xyz'"):
        load_worker("conveyor_app_with_bad_dep")


# -- a real process ----------------------------------------------------------------------------


def test_sigterm_makes_run_sync_return_and_the_process_exit_0(tmp_path: Path) -> None:
    # No coordinator listens on the port: the worker keeps reconnecting until SIGTERM,
    # then drains and exits 0 on its own.
    script = tmp_path / "run_worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, threading, logging
            from conveyor.worker import Worker

            logging.basicConfig(level=logging.INFO)
            worker = Worker("127.0.0.1:9", grace_period=1)
            worker.register("noop", lambda ctx, payload: None)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            worker.run_sync()
            print("returned")
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"
    assert "draining" in done.stderr
