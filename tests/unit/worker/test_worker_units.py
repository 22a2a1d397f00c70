"""Worker SDK pieces that need no server: loader, registry, context, codec, backoff."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from conveyor.transport import Backoff, ConnectionOptions
from conveyor.transport._errors import ConveyorError, WorkerIdInUseError
from conveyor.worker import (
    NoHandlersError,
    NonRetryableError,
    TaskContext,
    Worker,
    WorkerLoadError,
    load_worker,
)
from conveyor.worker import demo as demo_module
from conveyor.worker._codec import MAX_ERROR_BYTES, describe_exception, sanitize_error
from conveyor.worker._connection import RECONNECT_BACKOFF
from conveyor.worker._registry import TaskRegistry
from conveyor.worker._session import _classify, first_heartbeat_delay, liveness_timeout


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
    # hostname-pid-random: unique per process, readable in `conveyor status`.
    host, pid, random_part = worker.worker_id.rsplit("-", 2)
    assert host == socket.gethostname() and pid == str(os.getpid()) and len(random_part) == 6
    assert Worker().worker_id != worker.worker_id  # one id per worker object
    assert Worker(worker_id="w-1").worker_id == "w-1"


def test_a_worker_made_before_a_fork_gets_the_child_s_own_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = Worker("127.0.0.1:9")
    worker.register("noop", lambda ctx, payload: None)
    parent_id = worker.worker_id
    # As in a child after fork (a pre-forking server that imported the app): another pid.
    monkeypatch.setattr(os, "getpid", lambda: 424242)

    async def started_id() -> str:
        worker._start(install_signal_handlers=False)
        try:
            return worker.worker_id
        finally:
            worker._teardown()

    child_id = asyncio.run(started_id())
    assert child_id.split("-")[-2] == "424242" and child_id != parent_id
    explicit = Worker(worker_id="fixed")
    assert explicit.worker_id == "fixed"
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
        raise ValueError("deep " + "y" * 3 * MAX_ERROR_BYTES + " end")
    except ValueError as exc:
        text = describe_exception(exc)
    assert len(text.encode()) <= MAX_ERROR_BYTES
    assert text.startswith("ValueError: deep yyy")
    assert "[... truncated ...]" in text
    # The tail, where the traceback ends, is kept.
    assert text.rstrip().endswith("y end")
    assert describe_exception(NonRetryableError("x"), with_traceback=False) == (
        "NonRetryableError: x"
    )


def test_sanitize_error_makes_any_text_acceptable() -> None:
    """What PostgreSQL or protobuf would refuse never reaches the coordinator."""
    assert sanitize_error("a\x00b") == "a\\x00b"  # no NUL in text columns
    assert sanitize_error("bad \udcff name") == "bad ? name"  # a lone surrogate is no UTF-8
    wide = "€" * MAX_ERROR_BYTES  # 3 bytes each: the cap is in bytes, not characters
    capped = sanitize_error(wide)
    assert len(capped.encode()) <= MAX_ERROR_BYTES and "[... truncated ...]" in capped
    assert capped.startswith("€€") and capped.endswith("€€")
    assert sanitize_error("fine") == "fine"


# -- reconnect policy --------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    initial, maximum = RECONNECT_BACKOFF.initial, RECONNECT_BACKOFF.maximum
    first = [RECONNECT_BACKOFF.delay(1, rng=rng) for _ in range(50)]
    assert all(initial / 2 <= d <= initial for d in first)
    assert len(set(first)) > 1  # jittered
    assert all(0.2 <= RECONNECT_BACKOFF.delay(3, rng=rng) <= 0.4 for _ in range(50))
    for n in (6, 50, 10**6):
        assert maximum / 2 <= RECONNECT_BACKOFF.delay(n, rng=rng) <= maximum
    with pytest.raises(ValueError, match="invalid backoff"):
        Backoff(initial=2, maximum=1)


def test_liveness_timeout_leaves_room_before_leases_expire() -> None:
    # The defaults: 31 s before (3 x 10 s + 1 s, past the 30 s lease); now 20 s.
    assert liveness_timeout(10, 30) == 20
    assert liveness_timeout(0.5, 2) == 1.25  # the tests' coordinator settings
    assert liveness_timeout(1, 60) == 2.5  # long leases: silence is silence
    # However short the lease, an answer cannot come before its heartbeat.
    assert liveness_timeout(10, 12) == 15
    for heartbeat, lease in [(10, 30), (5, 30), (1, 3), (0.5, 2), (2, 10)]:
        assert liveness_timeout(heartbeat, lease) <= lease - heartbeat


class _FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, status: status_pb2.Status | None) -> None:
        trailing = (
            grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
            if status is not None
            else grpc.aio.Metadata()
        )
        super().__init__(code, grpc.aio.Metadata(), trailing, details="x")


def _status(code: int, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="conveyor.dev", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code, details=[detail])


def test_stream_errors_become_session_ends() -> None:
    leader = _status(code_pb2.UNAVAILABLE, "NOT_LEADER", {"leader_address": "10.0.0.2:50051"})
    end = _classify(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, leader), "a:1", welcomed=False, heard=False
    )
    assert end.redirect == "10.0.0.2:50051" and end.fatal is None

    in_use = _status(code_pb2.FAILED_PRECONDITION, "WORKER_ID_IN_USE", {"worker_id": "w"})
    end = _classify(
        _FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, in_use),
        "a:1",
        welcomed=False,
        heard=False,
    )
    assert isinstance(end.fatal, WorkerIdInUseError) and end.fatal.worker_id == "w"

    # Nothing answered: gRPC's own UNAVAILABLE before any message.
    end = _classify(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, None), "a:1", welcomed=False, heard=False
    )
    assert not end.reached and end.redirect is None and not end.rejected
    end = _classify(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, None), "a:1", welcomed=True, heard=True
    )
    assert end.reached
    # An UNAUTHENTICATED that does not say why: retried a while, as an unknown key.
    end = _classify(
        _FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, None), "a:1", welcomed=False, heard=False
    )
    assert end.rejected and end.reached and end.unknown_key is not None and end.fatal is None


@pytest.mark.parametrize(
    ("code", "reason", "metadata", "fatal"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {"problem": "revoked"}, True),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {"problem": "expired"}, True),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {"problem": "missing"}, True),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {"problem": "malformed"}, True),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", {"scope": "worker"}, True),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {"problem": "unknown"}, False),
    ],
)
def test_a_key_that_cannot_work_ends_the_worker(
    code: grpc.StatusCode, reason: str, metadata: dict[str, str], fatal: bool
) -> None:
    """Issue 15 item 9: only an unknown key (maybe a new one on its way) is retried."""
    status = _status(code.value[0], reason, metadata)
    end = _classify(_FakeRpcError(code, status), "a:1", welcomed=False, heard=False)
    assert (end.fatal is not None) == fatal
    assert (end.unknown_key is not None) == (not fatal)


def test_worker_without_handlers_refuses_to_start() -> None:
    worker = Worker("127.0.0.1:9", worker_id="lonely")
    with pytest.raises(NoHandlersError) as caught:
        asyncio.run(worker.run(install_signal_handlers=False))
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ConveyorError)
    assert message == (
        "worker lonely has no task handlers: register at least one with "
        "@worker.task('TYPE') before starting it"
    )
    assert not worker.running


def test_connection_options_reach_the_worker() -> None:
    worker = Worker(api_key="k", metadata=[("x-team", "a")])
    assert worker._options.call_metadata() == (("authorization", "Bearer k"), ("x-team", "a"))
    with pytest.raises(ValueError, match="api_key is given twice"):
        Worker(api_key="k", options=ConnectionOptions(api_key="other"))


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


def test_run_sync_sets_up_logging_and_says_it_cannot_reach_the_coordinator(
    tmp_path: Path,
) -> None:
    # No logging set-up in the app: run_sync() logs like `conveyor worker` does.
    script = tmp_path / "run_worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, signal
            from conveyor.worker import Worker

            class StopAfterTwoAttempts(logging.Handler):
                # On the worker's own logger, so the root logger stays unconfigured.
                seen = 0

                def emit(self, record: logging.LogRecord) -> None:
                    if "cannot reach" in record.getMessage():
                        self.seen += 1
                        if self.seen == 2:
                            os.kill(os.getpid(), signal.SIGTERM)

            logging.getLogger("conveyor.worker").addHandler(StopAfterTwoAttempts())
            worker = Worker("127.0.0.1:9", grace_period=1)
            worker.register("noop", lambda ctx, payload: None)
            worker.run_sync()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    unreachable = [line for line in lines if "cannot reach the coordinator at 127.0.0.1:9" in line]
    # One line per attempt, each naming the growing wait; never "lost the stream".
    assert len(unreachable) >= 2, done.stderr
    assert " WARNING conveyor.worker: cannot reach" in unreachable[0]
    assert all("trying again in" in line for line in unreachable)
    assert not any("lost the stream" in line for line in lines)
    assert any("INFO  conveyor.worker: worker " in line and "starting" in line for line in lines)


def test_first_heartbeats_of_workers_connecting_together_spread_over_the_interval() -> None:
    # Each session's first heartbeat at a random moment of its first interval, so a fleet
    # that connected in a storm (or reconnected after a failover) does not beat in step.
    delays = [first_heartbeat_delay(10.0) for _ in range(1000)]
    assert all(0.0 <= delay < 10.0 for delay in delays)
    assert {int(delay) for delay in delays} == set(range(10))
