"""Helpers shared by the integration tests (on sys.path via pytest's ``pythonpath``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, overload

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.coordinator import CoordinatorConfig
from conveyor.v1 import (
    task_pb2,
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
    from conveyor.coordinator.deps import Deps, Office
    from conveyor.coordinator.dispatch.sessions import SessionRegistry
    from conveyor.coordinator.lifecycle.watchers import TaskWatchers
    from conveyor.coordinator.store.db import Database

    office = Office(cluster)
    office.epoch, office.leader = epoch, True
    return Deps(
        config=coordinator_config(dsn, cluster=cluster, **config),
        db=Database(pool),
        office=office,
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
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


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None], *, timeout: float = ..., interval: float = ..., what: str = ...
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """The tests' one wait for a condition: polls ``check`` (a function, sync or async)
    until it returns a truthy value, which it returns; fails after ``timeout`` seconds,
    naming ``what`` it waited for and the last value. An exception from ``check`` ends the
    wait at once (a check can fail early, e.g. when the process it waits on exited).

    Polls quickly at first (a condition in memory is met within milliseconds), then every
    ``interval`` seconds (a check that queries a server should not hammer it).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = min(0.005, interval)
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value {last!r}"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, interval)


async def sleep_until(moment: datetime) -> None:
    """Waits for a wall-clock moment (a cron tick, a tick boundary): where the condition is
    the clock itself, a sleep is the wait for it."""
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


class HealthAsyncStub(Protocol):
    """``grpc.health.v1.Health`` on an aio channel, as the generated stub behaves."""

    Check: grpc.aio.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]
    Watch: grpc.aio.UnaryStreamMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]


def health_stub(channel: grpc.aio.Channel) -> HealthAsyncStub:
    """A typed health stub: typeshed's ``HealthStub`` declares no methods at all, so its
    calls would type-check as errors (or Any)."""
    return cast(HealthAsyncStub, health_pb2_grpc.HealthStub(channel))


_ConnectCall = grpc.aio.StreamStreamCall[
    worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
]


class RawWorker:
    """Drives one WorkerService.Connect stream message by message."""

    def __init__(self, address: str) -> None:
        # gRPC's default receive limit (4 MiB), as a worker in any language has it: the
        # coordinator must keep every message under it.
        self._channel = grpc.aio.insecure_channel(address)
        self._outgoing: asyncio.Queue[worker_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self._call: _ConnectCall | None = None
        self._pulse: asyncio.Task[None] | None = None
        self._held: list[worker_service_pb2.Lease] = []

    @property
    def call(self) -> _ConnectCall:
        """The Connect call (after :meth:`connect`)."""
        assert self._call is not None, "connect() first"
        return self._call

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
        encryption_keys: tuple[str, ...] | None = None,
        resume_token: bytes = b"",
    ) -> worker_service_pb2.Welcome:
        """Opens the stream with Hello; returns Welcome.

        ``pulse`` sends an empty Heartbeat every TEST_HEARTBEAT, as a live worker would, so
        the coordinator does not evict it for silence; it renews no lease (send
        heartbeats with leases to renew them, or :meth:`hold` them). ``metadata`` goes
        with the call (an API key).
        ``encryption_keys`` names the keys the worker opens (None: it does not say).
        ``resume_token`` is the one of an earlier Welcome: this Hello comes from the same
        worker process.
        """
        stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self._call = stub.Connect(self._requests(), metadata=metadata or None)
        hello = worker_service_pb2.Hello(
            protocol_version=1,
            worker_id=worker_id,
            credits=credits,
            task_types=types,
            queues=queues,
            in_flight=in_flight,
            hostname=hostname,
            pid=pid,
            encryption_keys=None
            if encryption_keys is None
            else worker_service_pb2.EncryptionKeys(key_ids=encryption_keys),
        )
        if resume_token:
            hello.resume_token = resume_token
        await self.send(hello=hello)
        first = await self.receive()
        assert first.WhichOneof("message") == "welcome", first
        if pulse:
            self._pulse = asyncio.create_task(self._beat())
        return first.welcome

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(TEST_HEARTBEAT)
            await self.send(heartbeat=worker_service_pb2.Heartbeat(leases=self._held))

    def hold(self, *leases: worker_service_pb2.Lease) -> None:
        """Makes the pulse renew ``leases`` from now on, as a live worker running them
        would: a test that holds one across slow steps (a loaded machine) keeps it."""
        self._held.extend(leases)

    async def send(self, **message: Any) -> None:
        await self._outgoing.put(worker_service_pb2.ConnectRequest(**message))

    async def receive(self, timeout: float = 30.0) -> worker_service_pb2.ConnectResponse:
        message = await asyncio.wait_for(self.call.read(), timeout)
        assert message is not grpc.aio.EOF, "the coordinator closed the stream"
        assert isinstance(message, worker_service_pb2.ConnectResponse), message
        return message

    async def receive_kind(self, kind: str, timeout: float = 30.0) -> Any:
        """The next message of ``kind`` (skipping others), as its inner message."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            message = await self.receive(max(0.01, remaining))
            if message.WhichOneof("message") == kind:
                return getattr(message, kind)

    async def assignments(self, count: int, timeout: float = 30.0) -> list[Any]:
        got: list[Any] = []
        while len(got) < count:
            batch = await self.receive_kind("assignments", timeout)
            got.extend(batch.assignments)
        return got

    async def report(
        self,
        lease: worker_service_pb2.Lease,
        outcome: worker_service_pb2.TaskOutcome.ValueType = (
            worker_service_pb2.TASK_OUTCOME_SUCCEEDED
        ),
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
                        outcome=outcome,
                        result=result,
                        error=error,
                        retryable=retryable,
                    )
                ]
            )
        )
        acks: worker_service_pb2.ResultAcks = await self.receive_kind("result_acks")
        return acks.acks[0]

    async def close(self) -> None:
        if self._pulse is not None:
            self._pulse.cancel()
            await asyncio.gather(self._pulse, return_exceptions=True)
        await self._outgoing.put(None)
        if self._call is not None:
            self._call.cancel()
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
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, type: str = "echo", **fields: Any
) -> task_pb2.Task:
    response = await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type=type, **fields))
    return response.task
