"""Helpers shared by the integration tests (on sys.path via pytest's ``pythonpath``)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from conveyor.coordinator import CoordinatorConfig
from conveyor.v1 import (
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

if TYPE_CHECKING:
    from conveyor.coordinator.deps import Deps

T = TypeVar("T")

SUPPORT_DIR = Path(__file__).parent

# Short leases so lease-expiry paths run in seconds, not minutes.
TEST_LEASE = 2.0
TEST_HEARTBEAT = 0.5


async def leader_pool(dsn: str, *, cluster: str = "default") -> tuple[asyncpg.Pool, int]:
    """A small pool on a migrated database, and a fresh leader term (its epoch) to fence
    writes with: for running coordinator services and store functions alone. Close the
    pool when done."""
    from conveyor.coordinator.store import leadership
    from conveyor.coordinator.store.migrator import migrate

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    async with pool.acquire() as conn:
        await migrate(conn)
        epoch = await leadership.take_office(conn, cluster, "test", "")
    assert epoch is not None
    return pool, epoch


def service_deps(
    pool: asyncpg.Pool, dsn: str, *, epoch: int, cluster: str = "default", **config: Any
) -> Deps:
    """The dependencies of coordinator services, for running one alone on ``pool`` as the
    leader of ``epoch`` (taken with ``store.leadership.take_office``)."""
    from conveyor.coordinator.deps import Deps, Events, Office
    from conveyor.coordinator.sessions import SessionRegistry
    from conveyor.coordinator.store.db import Database
    from conveyor.coordinator.watchers import TaskWatchers

    office = Office(cluster)
    office.epoch, office.leader = epoch, True
    return Deps(
        config=coordinator_config(dsn, cluster=cluster, **config),
        db=Database(pool),
        office=office,
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
        events=Events(),
    )


def coordinator_config(dsn: str, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "dsn": dsn,
        "listen": "127.0.0.1:0",
        "lease_duration": TEST_LEASE,
        "heartbeat_interval": TEST_HEARTBEAT,
        "reaper_interval": 0.2,
        "poll_interval": 0.5,
        "pool_min_size": 1,
        "pool_max_size": 6,
        # Authentication off unless a test is about it (tests/integration/security).
        "authentication": False,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


async def eventually(
    check: Callable[[], Awaitable[T] | T], *, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """The tests' one wait for a condition: polls ``check`` (a function, sync or async)
    until it returns a truthy value, which it returns; fails after ``timeout`` seconds,
    showing the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return cast(T, last)
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value {last!r}")
        await asyncio.sleep(interval)


class RawWorker:
    """Drives one WorkerService.Connect stream message by message."""

    def __init__(self, address: str) -> None:
        # gRPC's default receive limit (4 MiB), as a worker in any language has it: the
        # coordinator must keep every message under it.
        self._channel = grpc.aio.insecure_channel(address)
        self._outgoing: asyncio.Queue[worker_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call: Any = None
        self._pulse: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        while True:
            message = await self._outgoing.get()
            if message is None:
                return
            yield message

    async def connect(
        self,
        worker_id: str = "raw-worker",
        *,
        credits: int = 10,
        types: tuple[str, ...] = ("echo",),
        queues: tuple[str, ...] = (),
        in_flight: tuple[worker_service_pb2.Lease, ...] = (),
        hostname: str = "",
        pid: int = 0,
        pulse: bool = True,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> worker_service_pb2.Welcome:
        """Opens the stream with Hello; returns Welcome.

        ``pulse`` sends an empty Heartbeat every TEST_HEARTBEAT, as a live worker would, so
        the coordinator does not evict it for silence; it renews no lease (send
        heartbeats with leases to renew them). ``metadata`` goes with the call (an API key).
        """
        stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self.call = stub.Connect(self._requests(), metadata=metadata or None)
        await self.send(
            hello=worker_service_pb2.Hello(
                protocol_version=1,
                worker_id=worker_id,
                credits=credits,
                task_types=types,
                queues=queues,
                in_flight=in_flight,
                hostname=hostname,
                pid=pid,
            )
        )
        first = await self.receive()
        assert first.WhichOneof("message") == "welcome", first
        if pulse:
            self._pulse = asyncio.create_task(self._beat())
        return first.welcome

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(TEST_HEARTBEAT)
            await self.send(heartbeat=worker_service_pb2.Heartbeat())

    async def send(self, **message: Any) -> None:
        await self._outgoing.put(worker_service_pb2.ConnectRequest(**message))

    async def receive(self, timeout: float = 10.0) -> worker_service_pb2.ConnectResponse:
        message = await asyncio.wait_for(self.call.read(), timeout)
        assert message is not grpc.aio.EOF, "the coordinator closed the stream"
        return message  # type: ignore[no-any-return]

    async def receive_kind(self, kind: str, timeout: float = 10.0) -> Any:
        """The next message of ``kind`` (skipping others), as its inner message."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            message = await self.receive(max(0.01, remaining))
            if message.WhichOneof("message") == kind:
                return getattr(message, kind)

    async def assignments(self, count: int, timeout: float = 10.0) -> list[Any]:
        got: list[Any] = []
        while len(got) < count:
            batch = await self.receive_kind("assignments", timeout)
            got.extend(batch.assignments)
        return got

    async def report(
        self,
        lease: worker_service_pb2.Lease,
        outcome: int = worker_service_pb2.TASK_OUTCOME_SUCCEEDED,
        *,
        result: bytes = b"",
        error: str = "",
        retryable: bool = True,
    ) -> worker_service_pb2.ResultAck:
        await self.send(
            results=worker_service_pb2.Results(
                results=[
                    worker_service_pb2.TaskResult(
                        lease=lease,
                        outcome=outcome,  # type: ignore[arg-type]
                        result=result,
                        error=error,
                        retryable=retryable,
                    )
                ]
            )
        )
        acks = await self.receive_kind("result_acks")
        return acks.acks[0]  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._pulse is not None:
            self._pulse.cancel()
            await asyncio.gather(self._pulse, return_exceptions=True)
        await self._outgoing.put(None)
        if self.call is not None:
            self.call.cancel()
        await self._channel.close()


@dataclass
class ErrorDetails:
    """The google.rpc details of an error status, as tests look at them."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    retry_after: float | None = None
    quota_subjects: list[str] = field(default_factory=list)


def error_details(err: grpc.aio.AioRpcError) -> ErrorDetails:
    """Reads the status of a failed call; fails the test when it carries no rich details
    (every coordinator error must)."""
    out = ErrorDetails(err.code(), err.details() or "")
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), f"{err.code()} {err.details()!r} carries no google.rpc.Status"
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "conveyor.dev"
            out.reason, out.metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.fields = [v.field for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            out.quota_subjects = [v.subject for v in quota.violations]
    return out


async def submit(
    stub: task_service_pb2_grpc.TaskServiceStub, type: str = "echo", **fields: Any
) -> Any:
    response = await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type=type, **fields))
    return response.task


# -- for tests/integration/test_worker_processes.py, on the one process harness ---------------


def spawn_worker(
    address: str,
    app: str,
    log_path: str,
    *,
    concurrency: int = 10,
    grace: float = 10.0,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Starts ``conveyor worker APP`` as a separate process (a ``cluster.WorkerProcess``:
    its own process group, output beside ``log_path``); returns its Popen."""
    from cluster import WorkerProcess

    worker = WorkerProcess(
        address,
        log_path,
        log_dir=Path(log_path).parent,
        app=app,
        concurrency=concurrency,
        grace=grace,
        extra_args=extra,
    ).start()
    assert worker.proc is not None
    return worker.proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Kills a test process that is still running (cleanup after a failed test)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def completions(log_path: str) -> list[tuple[str, int]]:
    """(task id, attempt) of every handler run that completed, from the worker app's log."""
    from cluster import read_effects

    return read_effects(log_path)
