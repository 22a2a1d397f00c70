"""The worker SDK against a fake WorkerService on a real grpc.aio server (127.0.0.1:0)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from testsupport import eventually

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.v1 import worker_service_pb2_grpc as pb_grpc
from conveyor.worker import NonRetryableError, TaskContext, Worker, WorkerIdInUseError
from conveyor.worker.demo import create_worker

Key = tuple[str, int]

# -- the fake coordinator ------------------------------------------------------------------

_END = object()
_ABORT = object()


class FakeStream:
    """One Connect call as the fake coordinator sees it."""

    def __init__(self) -> None:
        self.received: list[pb.ConnectRequest] = []
        self.outgoing: asyncio.Queue[object] = asyncio.Queue()
        self.credit = 0  # granted and not yet used by an assignment
        self.granted = 0
        self.half_closed = False
        self.ended = False

    def send(self, **fields: Any) -> None:
        self.outgoing.put_nowait(pb.ConnectResponse(**fields))

    def assign(self, *assignments: pb.Assignment) -> None:
        self.credit -= len(assignments)
        self.send(assignments=pb.Assignments(assignments=assignments))

    def abort(self) -> None:
        """End the call with UNAVAILABLE, as a crashing coordinator would."""
        self.outgoing.put_nowait(_ABORT)

    def of(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.received if m.WhichOneof("message") == kind]

    @property
    def hello(self) -> pb.Hello | None:
        hellos = self.of("hello")
        return hellos[0] if hellos else None

    def results(self) -> list[pb.TaskResult]:
        return [r for batch in self.of("results") for r in batch.results]


class FakeCoordinator(pb_grpc.WorkerServiceServicer):
    """A scriptable coordinator: answers Hello, heartbeats and (optionally) results."""

    def __init__(self, *, heartbeat_interval: float = 0.1) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.streams: list[FakeStream] = []
        self.auto_ack = True
        self.answer_heartbeats = True
        self.epoch = 7
        self.redirect_to: str | None = None
        self.not_leader: str | None = None
        # A status every Connect is refused with, when set.
        self.refuse: status_pb2.Status | None = None
        self.lease_duration: float | None = None
        self.liveness_timeout: float | None = None
        self.welcome_lost: list[pb.Lease] = []
        self.lost: set[Key] = set()
        # Assignments handed out as credit allows, like the real dispatcher.
        self.queue: list[pb.Assignment] = []
        # Welcome.credit_in_results: read Results.credits (off: an older coordinator,
        # which ignores that field).
        self.credit_in_results = False
        # Welcome.result_acks_by_sequence: answer numbered Results messages as a whole,
        # naming only the results of the attempts in refuse_results.
        self.acks_by_sequence = False
        self.refuse_results: set[Key] = set()

    @property
    def stream(self) -> FakeStream:
        return self.streams[-1]

    def results(self) -> list[pb.TaskResult]:
        return [r for s in self.streams for r in s.results()]

    def result_for(self, task_id: str) -> pb.TaskResult | None:
        found = [r for r in self.results() if r.lease.task_id == task_id]
        return found[-1] if found else None

    def dispatch(self, stream: FakeStream) -> None:
        n = min(stream.credit, len(self.queue))
        if n > 0:
            batch, self.queue = self.queue[:n], self.queue[n:]
            stream.assign(*batch)

    # Written with context.write(), grpc.aio's other style of stream handler, which the
    # generated stubs do not describe (as coordinator/worker_service.py).
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        stream = FakeStream()
        self.streams.append(stream)
        if self.not_leader is not None:
            await context.abort_with_status(rpc_status.to_status(_not_leader(self.not_leader)))
        if self.refuse is not None:
            await context.abort_with_status(rpc_status.to_status(self.refuse))
        reader = asyncio.create_task(self._read(stream, context))
        try:
            while True:
                item = await stream.outgoing.get()
                if item is _END:
                    return
                if item is _ABORT:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator going away")
                assert isinstance(item, pb.ConnectResponse)
                await context.write(item)
        finally:
            stream.ended = True
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, stream: FakeStream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                stream.half_closed = True
                stream.outgoing.put_nowait(_END)
                return
            stream.received.append(request)
            kind = request.WhichOneof("message")
            if kind == "hello":
                if self.redirect_to is not None:
                    stream.send(redirect=pb.Redirect(leader_address=self.redirect_to))
                    continue
                interval = duration_pb2.Duration()
                interval.FromTimedelta(timedelta(seconds=self.heartbeat_interval))
                welcome = pb.Welcome(
                    session_id=f"session-{len(self.streams)}",
                    epoch=self.epoch,
                    heartbeat_interval=interval,
                    lost=self.welcome_lost,
                    resume_token=f"token-{len(self.streams)}".encode(),
                    credit_in_results=self.credit_in_results,
                    result_acks_by_sequence=self.acks_by_sequence,
                )
                if self.lease_duration is not None:
                    welcome.lease_duration.FromTimedelta(timedelta(seconds=self.lease_duration))
                if self.liveness_timeout is not None:
                    welcome.liveness_timeout.FromTimedelta(timedelta(seconds=self.liveness_timeout))
                stream.send(welcome=welcome)
                self._grant(stream, request.hello.credits)
            elif kind == "credit":
                self._grant(stream, request.credit.credits)
            elif kind == "heartbeat" and self.answer_heartbeats:
                lost = [
                    lease
                    for lease in request.heartbeat.leases
                    if (lease.task_id, lease.attempt) in self.lost
                ]
                stream.send(heartbeat_ack=pb.HeartbeatAck(lost=lost))
            elif kind == "results":
                if self.credit_in_results:
                    self._grant(stream, request.results.credits)
                if self.auto_ack and self.acks_by_sequence and request.results.sequence:
                    refused = [
                        pb.ResultAck(lease=r.lease, accepted=False, reason="refused")
                        for r in request.results.results
                        if (r.lease.task_id, r.lease.attempt) in self.refuse_results
                    ]
                    stream.send(
                        result_acks=pb.ResultAcks(sequence=request.results.sequence, acks=refused)
                    )
                elif self.auto_ack:
                    acks = [
                        pb.ResultAck(lease=r.lease, accepted=True) for r in request.results.results
                    ]
                    stream.send(result_acks=pb.ResultAcks(acks=acks))

    def _grant(self, stream: FakeStream, credits: int) -> None:
        stream.credit += credits
        stream.granted += credits
        self.dispatch(stream)


def _not_leader(leader: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        reason="NOT_LEADER", domain="conveyor.dev", metadata={"leader_address": leader}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code_pb2.UNAVAILABLE, message="not the leader", details=[detail])


async def serve(fake: FakeCoordinator, port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(fake, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{bound}"


@pytest.fixture
async def coordinator() -> AsyncIterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator()
    server, address = await serve(fake)
    yield fake, address
    await server.stop(None)


def assignment(
    task_id: str,
    task_type: str = "work",
    payload: bytes = b"",
    *,
    attempt: int = 1,
    timeout: float | None = None,
    epoch: int = 7,
) -> pb.Assignment:
    message = pb.Assignment(
        lease=pb.Lease(task_id=task_id, attempt=attempt, epoch=epoch),
        queue="default",
        type=task_type,
        payload=payload,
        content_type="application/json",
        max_attempts=3,
        idempotency_key=f"key-{task_id}",
        labels={"team": "infra"},
    )
    if timeout is not None:
        message.timeout.FromTimedelta(timedelta(seconds=timeout))
    return message


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in the background; always stop it, fast, at the end."""
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.sleep(0)  # let run() start, so that shutdown() below reaches it
    try:
        async with asyncio.timeout(5):
            await worker.wait_connected()
        yield task
    finally:
        worker.shutdown(force=True)
        async with asyncio.timeout(10):
            await asyncio.gather(task, return_exceptions=True)


def keys(results: Iterable[pb.TaskResult]) -> set[Key]:
    return {(r.lease.task_id, r.lease.attempt) for r in results}


# -- tests -----------------------------------------------------------------------------------


async def test_hello_announces_the_worker(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address, queues=["q1", "q2"], concurrency=4, worker_id="w-1")
    worker.register("alpha", lambda ctx, payload: None)
    worker.register("beta", lambda ctx, payload: None)

    async with running(worker):
        await worker.wait_connected()
        hello = fake.stream.hello
        assert hello is not None
        assert hello.protocol_version == 1
        assert hello.worker_id == "w-1"
        assert hello.hostname == socket.gethostname()
        assert hello.pid == os.getpid()
        assert list(hello.queues) == ["q1", "q2"]
        assert sorted(hello.task_types) == ["alpha", "beta"]
        assert hello.credits == 4
        assert list(hello.in_flight) == []
        # The first message on the stream is Hello.
        assert fake.stream.received[0].WhichOneof("message") == "hello"


async def test_json_payloads_results_and_context(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address)
    seen: list[TaskContext] = []

    @worker.task("add")
    async def add(ctx: TaskContext, payload: dict[str, int]) -> dict[str, int]:
        seen.append(ctx)
        return {"sum": payload["a"] + payload["b"]}

    @worker.task("echo", raw=True)
    async def echo(ctx: TaskContext, payload: bytes) -> bytes:
        return payload[::-1]

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(
            assignment("t1", "add", b'{"a": 2, "b": 3}', timeout=30),
            assignment("t2", "echo", b"\x00\x01raw"),
            assignment("t3", "add", b"{not json"),
        )
        await eventually(lambda: len(fake.results()) == 3, what="three results")

    ok = fake.result_for("t1")
    assert ok is not None and ok.outcome == pb.TASK_OUTCOME_SUCCEEDED
    assert json.loads(ok.result) == {"sum": 5}
    raw = fake.result_for("t2")
    assert raw is not None and raw.result == b"war\x01\x00"
    bad = fake.result_for("t3")
    assert bad is not None and bad.outcome == pb.TASK_OUTCOME_FAILED
    assert not bad.retryable and "not valid JSON" in bad.error

    ctx = seen[0]
    assert (ctx.task_id, ctx.type, ctx.queue, ctx.attempt) == ("t1", "add", "default", 1)
    assert ctx.max_attempts == 3 and ctx.idempotency_key == "key-t1"
    assert dict(ctx.labels) == {"team": "infra"}
    assert ctx.deadline is not None and 0 < ctx.deadline - time.monotonic() <= 30
    assert ctx.worker_id == worker.worker_id


async def test_failures_unknown_types_and_non_retryable(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=4)

    @worker.task("boom")
    async def boom(ctx: TaskContext, payload: Any) -> None:
        raise ValueError("kaboom")

    @worker.task("crash")
    def crash(ctx: TaskContext, payload: Any) -> None:
        raise RuntimeError("crashed in a thread")

    @worker.task("fatal")
    def fatal(ctx: TaskContext, payload: Any) -> None:
        raise NonRetryableError("bad input")

    async with running(worker):
        fake.stream.assign(assignment("t1", "boom"), assignment("t2", "fatal"))
        fake.stream.assign(assignment("t3", "nobody-handles-this"), assignment("t4", "crash"))
        await eventually(lambda: len(fake.results()) == 4, what="four results")
        # The unknown type took no slot: its credit comes back (4 in Hello + 4 returned).
        await eventually(lambda: fake.stream.granted == 8, what="credit returned")

    boomed = fake.result_for("t1")
    assert boomed is not None and boomed.outcome == pb.TASK_OUTCOME_FAILED
    assert boomed.retryable
    assert boomed.error.startswith("ValueError: kaboom\n\nTraceback")
    # The traceback starts at the handler, not in the SDK.
    assert ", in boom\n" in boomed.error and "_runtime.py" not in boomed.error
    crashed = fake.result_for("t4")
    assert crashed is not None and crashed.retryable
    assert crashed.error.startswith("RuntimeError: crashed in a thread")
    assert ", in crash\n" in crashed.error and "thread.py" not in crashed.error
    fatal_result = fake.result_for("t2")
    assert fatal_result is not None and not fatal_result.retryable
    assert fatal_result.error == "NonRetryableError: bad input"
    unknown = fake.result_for("t3")
    assert unknown is not None and unknown.outcome == pb.TASK_OUTCOME_FAILED
    assert not unknown.retryable
    assert "no handler registered for task type 'nobody-handles-this'" in unknown.error


async def test_credit_never_exceeds_concurrency(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=3)
    active = 0
    peak = 0

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.01)
        finally:
            active -= 1

    fake.queue = [assignment(f"t{i}") for i in range(12)]
    async with running(worker):
        await eventually(lambda: len(fake.results()) == 12, what="all results")
        # Hello's 3 and one credit per freed slot: never more than the worker can take.
        await eventually(lambda: fake.stream.granted == 15, what="final credit")
        assert fake.stream.credit == 3
    assert peak == 3
    assert all(r.outcome == pb.TASK_OUTCOME_SUCCEEDED for r in fake.results())


async def test_oversent_assignments_wait_for_a_slot(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=2)
    active = 0
    peak = 0

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.01)
        finally:
            active -= 1

    async with running(worker):
        await worker.wait_connected()
        # A misbehaving coordinator ignores the credit of 2.
        fake.stream.assign(*(assignment(f"t{i}") for i in range(6)))
        await eventually(lambda: len(fake.results()) == 6, what="all results")
        await eventually(lambda: fake.stream.granted == 4, what="credit for the free slots")
    assert peak == 2


async def test_credits_freed_together_are_coalesced(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=5)
    release = asyncio.Event()
    started = 0

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        nonlocal started
        started += 1
        await release.wait()

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(*(assignment(f"t{i}") for i in range(5)))
        await eventually(lambda: started == 5, what="all handlers started")
        release.set()
        await eventually(lambda: fake.stream.granted == 10, what="credit back")
        assert [c.credits for c in fake.stream.of("credit")] == [5]


async def test_credit_travels_in_results_when_the_coordinator_reads_it(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    fake.credit_in_results = True
    worker = Worker(address, concurrency=5)
    release = asyncio.Event()
    started = 0

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        nonlocal started
        started += 1
        await release.wait()

    fake.queue = [assignment(f"t{i}") for i in range(12)]
    async with running(worker):
        await eventually(lambda: started == 5, what="the first handlers started")
        release.set()
        await eventually(lambda: len(fake.results()) == 12, what="all results")
        # Hello's 5 and one credit per freed slot, every one of them in a Results message
        # (each attempt that freed a slot had a result to send): no Credit message at all.
        await eventually(lambda: fake.stream.granted == 17, what="final credit")
        assert fake.stream.of("credit") == []
        assert sum(r.credits for r in fake.stream.of("results")) == 12
        assert fake.stream.credit == 5


async def test_credit_stays_out_of_results_for_an_older_coordinator(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=3)

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        await asyncio.sleep(0)

    fake.queue = [assignment(f"t{i}") for i in range(9)]
    async with running(worker):
        await eventually(lambda: len(fake.results()) == 9, what="all results")
        await eventually(lambda: fake.stream.granted == 12, what="final credit")
        # Its Welcome did not say it reads Results.credits: Credit messages only.
        assert all(r.credits == 0 for r in fake.stream.of("results"))
        assert sum(c.credits for c in fake.stream.of("credit")) == 9
        # Nor did it say it answers numbered Results messages: none is numbered.
        assert all(r.sequence == 0 for r in fake.stream.of("results"))


async def test_results_answered_as_a_whole_are_dropped_and_refusals_said(
    coordinator: tuple[FakeCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, address = coordinator
    fake.acks_by_sequence = True
    fake.refuse_results = {("t4", 1)}
    worker = Worker(address, concurrency=3)

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        await asyncio.sleep(0)

    fake.queue = [assignment(f"t{i}") for i in range(9)]
    async with running(worker):
        await eventually(lambda: len(fake.results()) == 9, what="all results")
        # Every result was answered (eight accepted by the message's number, one refused
        # by name): a later heartbeat lists no lease of a result still waiting.
        beats = len(fake.stream.of("heartbeat"))

        def later_beat_without_leases() -> bool:
            later = fake.stream.of("heartbeat")[beats:]
            return bool(later) and not later[-1].leases

        await eventually(later_beat_without_leases, what="a heartbeat without leases")
        numbers = [r.sequence for r in fake.stream.of("results")]
    assert numbers == list(range(1, len(numbers) + 1))
    refusals = [r.getMessage() for r in _refusals(caplog)]
    assert refusals == ["coordinator refused the result of task t4 attempt 1: refused"]


async def test_results_are_batched(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=50)

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> str:
        return ctx.task_id

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(*(assignment(f"t{i}") for i in range(40)))
        await eventually(lambda: len(fake.results()) == 40, what="all results")
        # Forty results finishing together travel in one or two messages, not forty.
        assert len(fake.stream.of("results")) <= 2


async def test_each_hello_presents_the_last_welcomes_resume_token(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    """The token proves to the coordinator that the leases Hello lists are this process's:
    none on the first Hello, then the one the last Welcome gave, across sessions."""
    fake, address = coordinator
    worker = Worker(address)
    worker.register("work", lambda ctx, payload: None)

    async with running(worker):
        for n in (1, 2):
            await eventually(functools.partial(_said_hello_on, fake, n), what="Hello")
            await eventually(lambda: fake.stream.of("heartbeat"), what="a welcomed session")
            fake.stream.abort()
        await eventually(lambda: len(fake.streams) == 3 and fake.stream.hello, what="Hello 3")
    tokens = [stream.hello.resume_token for stream in fake.streams if stream.hello]
    assert tokens == [b"", b"token-1", b"token-2"]


async def test_unacked_results_are_resent_after_reconnect(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    fake.auto_ack = False
    worker = Worker(address)

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> str:
        return ctx.task_id

    async with running(worker):
        await worker.wait_connected()
        first = fake.stream
        first.assign(assignment("t1"), assignment("t2"))
        await eventually(lambda: len(first.results()) == 2, what="results on stream 1")
        first.abort()

        await eventually(lambda: len(fake.streams) == 2 and fake.stream.hello, what="reconnect")
        second = fake.stream
        # Unacknowledged results keep their leases listed, or the coordinator would take
        # the tasks back (and refuse the resent results as stale).
        assert second.hello is not None
        assert keys_of(second.hello.in_flight) == {("t1", 1), ("t2", 1)}
        await eventually(lambda: len(second.results()) == 2, what="results resent")
        assert keys(second.results()) == {("t1", 1), ("t2", 1)}
        # Accepted or refused, an ack settles a result.
        second.send(
            result_acks=pb.ResultAcks(
                acks=[
                    pb.ResultAck(lease=second.results()[0].lease, accepted=True),
                    pb.ResultAck(lease=second.results()[1].lease, accepted=False, reason="stale"),
                ]
            )
        )
        # A heartbeat lists the leases of results not acked yet: one that lists none was
        # sent after the worker read the acks (any heartbeat at all, as before, could
        # have been sent before it read them, on a slow machine).
        await eventually(
            lambda: any(not beat.leases for beat in second.of("heartbeat")),
            what="a heartbeat after the acks",
        )
        second.abort()

        await eventually(lambda: len(fake.streams) == 3 and fake.stream.hello, what="reconnect 2")
        third = fake.stream
        assert third.hello is not None and list(third.hello.in_flight) == []
        # By its first heartbeat the session has flushed whatever it had to resend.
        await eventually(lambda: third.of("heartbeat"), what="a heartbeat on stream 3")
        assert third.results() == []


async def test_timeout_is_reported_as_timed_out(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=2)
    cancelled: list[str] = []
    thread_saw_cancel = threading.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.cancelled.reason)
            raise

    @worker.task("hang-sync")
    def hang_sync(ctx: TaskContext, payload: Any) -> str:
        # A well-behaved sync handler: it watches the cancel flag.
        while not ctx.is_cancelled():
            ctx.cancelled.wait_sync(0.005)
        thread_saw_cancel.set()
        return "too late"

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(
            assignment("t1", "hang", timeout=0.05), assignment("t2", "hang-sync", timeout=0.05)
        )
        await eventually(lambda: len(fake.results()) == 2, what="both timed out")
        await eventually(thread_saw_cancel.is_set, what="the thread to see the cancel flag")
        # The thread returned, so its slot (and credit) came back: 2 + 2.
        await eventually(lambda: fake.stream.granted == 4, what="slots freed")

    assert cancelled == ["timed out"]
    for task_id in ("t1", "t2"):
        result = fake.result_for(task_id)
        assert result is not None
        assert result.outcome == pb.TASK_OUTCOME_TIMED_OUT
        assert result.retryable
        assert result.error == "attempt timed out after 0.05s"


async def test_cancel_tasks_reports_cancelled(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert ctx.is_cancelled()
            cancelled.set()
            raise

    async with running(worker):
        await worker.wait_connected()
        task = assignment("t1", "hang")
        fake.stream.assign(task)
        async with asyncio.timeout(5):
            await started.wait()
        fake.stream.send(cancel_tasks=pb.CancelTasks(leases=[task.lease]))
        await eventually(fake.results, what="a result")
        async with asyncio.timeout(5):
            await cancelled.wait()

    result = fake.result_for("t1")
    assert result is not None and result.outcome == pb.TASK_OUTCOME_CANCELLED


async def test_lost_lease_is_abandoned_without_a_result(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address)
    started = asyncio.Event()
    abandoned = asyncio.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            abandoned.set()
            raise

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        return None

    async with running(worker):
        await worker.wait_connected()
        stream = fake.stream
        stream.assign(assignment("t1", "hang"))
        async with asyncio.timeout(5):
            await started.wait()
        # Heartbeats carry the lease while the handler runs.
        await eventually(
            lambda: any(("t1", 1) in keys_of(h.leases) for h in stream.of("heartbeat")),
            what="a heartbeat with the lease",
        )
        fake.lost = {("t1", 1)}
        async with asyncio.timeout(5):
            await abandoned.wait()
        beats = len(stream.of("heartbeat"))
        # Later heartbeats no longer carry it, and a later task still reports normally.
        await eventually(
            lambda: len(stream.of("heartbeat")) > beats, timeout=30, what="another heartbeat"
        )
        assert ("t1", 1) not in keys_of(stream.of("heartbeat")[-1].leases)
        stream.assign(assignment("t2", "work"))
        await eventually(fake.results, what="the second task's result")
        assert keys(fake.results()) == {("t2", 1)}


def keys_of(leases: Iterable[pb.Lease]) -> set[Key]:
    return {(lease.task_id, lease.attempt) for lease in leases}


async def test_sync_handler_runs_in_a_thread(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=2)
    loop_thread = threading.get_ident()
    handler_thread: list[int] = []
    proceed = threading.Event()

    @worker.task("blocking")
    def blocking(ctx: TaskContext, payload: Any) -> str:
        handler_thread.append(threading.get_ident())
        # Blocks its thread until the test saw the async task finish: if this ran on the
        # event loop, that could never happen and the test would time out.
        assert proceed.wait(5)
        return "done"

    @worker.task("quick")
    async def quick(ctx: TaskContext, payload: Any) -> str:
        return "quick"

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(assignment("t1", "blocking"))
        await eventually(lambda: handler_thread, what="the sync handler to start")
        fake.stream.assign(assignment("t2", "quick"))
        await eventually(lambda: fake.result_for("t2"), what="the async result")
        proceed.set()
        await eventually(lambda: fake.result_for("t1"), what="the sync result")

    assert handler_thread[0] != loop_thread
    result = fake.result_for("t1")
    assert result is not None and json.loads(result.result) == "done"


async def test_drain_finishes_running_work_and_returns(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, grace_period=5)
    started = asyncio.Event()
    release = asyncio.Event()

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> str:
        started.set()
        await release.wait()
        return "finished"

    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        async with asyncio.timeout(5):
            await worker.wait_connected()
            stream = fake.stream
            stream.assign(assignment("t1"))
            await started.wait()
        worker.shutdown()
        await eventually(lambda: stream.of("drain"), what="Drain")
        assert not task.done()
        release.set()
        async with asyncio.timeout(5):
            await task
    finally:
        worker.shutdown(force=True)
        await asyncio.gather(task, return_exceptions=True)

    result = fake.result_for("t1")
    assert result is not None and result.outcome == pb.TASK_OUTCOME_SUCCEEDED
    # Drain came before the result, no credit after it, and the stream was half-closed.
    kinds = [m.WhichOneof("message") for m in stream.received]
    assert kinds.index("drain") < kinds.index("results")
    assert "credit" not in kinds[kinds.index("drain") :]
    assert stream.half_closed
    assert not worker.running


async def test_drain_stops_work_past_the_grace_period(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, grace_period=0.05)
    started = asyncio.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    async with worker:
        await worker.wait_connected()
        fake.stream.assign(assignment("t1", "hang"))
        async with asyncio.timeout(5):
            await started.wait()
    # Leaving the block drained the worker: past the grace period the attempt is reported
    # INTERRUPTED (ready again at once, not counted), not as a failure.
    result = fake.result_for("t1")
    assert result is not None and result.outcome == pb.TASK_OUTCOME_INTERRUPTED
    assert result.retryable and result.error == "worker shut down"


async def test_second_signal_stops_at_once(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address, grace_period=30)
    started = asyncio.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    # pytest runs tests on the main thread, where the worker installs its handlers.
    task = asyncio.create_task(worker.run(install_signal_handlers=True))
    try:
        async with asyncio.timeout(5):
            await worker.wait_connected()
            stream = fake.stream
            stream.assign(assignment("t1", "hang"))
            await started.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await eventually(lambda: stream.of("drain"), what="Drain after SIGTERM")
        assert not task.done()  # the grace period is 30 s
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            await task
    finally:
        worker.shutdown(force=True)
        await asyncio.gather(task, return_exceptions=True)

    result = fake.result_for("t1")
    assert result is not None and result.error == "worker shut down"


async def test_reconnects_after_the_server_restarts_and_resumes_in_flight() -> None:
    first = FakeCoordinator()
    server, address = await serve(first)
    port = int(address.rsplit(":", 1)[1])
    worker = Worker(address)
    started = asyncio.Event()
    release = asyncio.Event()

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> str:
        started.set()
        await release.wait()
        return "survived"

    second = FakeCoordinator()
    try:
        async with running(worker):
            await worker.wait_connected()
            first.stream.assign(assignment("t1"))
            async with asyncio.timeout(5):
                await started.wait()
            await server.stop(None)
            server, _ = await serve(second, port)

            await eventually(lambda: second.streams and second.stream.hello, what="reconnect")
            hello = second.stream.hello
            assert hello is not None
            # The handler kept running; its lease is resumed, and its slot is not offered.
            assert keys_of(hello.in_flight) == {("t1", 1)}
            assert hello.in_flight[0].epoch == 7
            assert hello.credits == worker.concurrency - 1
            release.set()
            await eventually(second.results, what="the result on the new server")
    finally:
        await server.stop(None)

    result = second.result_for("t1")
    assert result is not None and json.loads(result.result) == "survived"


async def test_follows_redirect_message_and_not_leader_status() -> None:
    leader = FakeCoordinator()
    follower = FakeCoordinator()
    refuser = FakeCoordinator()
    servers = []
    try:
        leader_server, leader_address = await serve(leader)
        servers.append(leader_server)
        follower.redirect_to = leader_address
        follower_server, follower_address = await serve(follower)
        servers.append(follower_server)
        refuser.not_leader = follower_address
        refuser_server, refuser_address = await serve(refuser)
        servers.append(refuser_server)

        # refuser -> NOT_LEADER status naming the follower -> Redirect to the leader.
        worker = Worker(refuser_address)
        worker.register("work", lambda ctx, payload: None)
        async with running(worker):
            async with asyncio.timeout(5):
                await worker.wait_connected()
            assert len(leader.streams) == 1 and leader.stream.hello is not None
            assert len(refuser.streams) == 1 and len(follower.streams) == 1
    finally:
        for server in servers:
            await server.stop(None)


async def test_demo_tasks(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = create_worker(address)
    assert set(worker.task_types) == {"echo", "sleep", "fail"}

    async with running(worker):
        await worker.wait_connected()
        fake.stream.assign(
            assignment("t1", "echo", b"\xffbytes"),
            assignment("t2", "sleep", b"0.01"),
            assignment("t3", "fail"),
            assignment("t4", "sleep", b'"soon"'),
            assignment("t5", "sleep", b"30", timeout=0.05),
        )
        await eventually(lambda: len(fake.results()) == 5, what="five results")

    echo = fake.result_for("t1")
    assert echo is not None and echo.result == b"\xffbytes"
    slept = fake.result_for("t2")
    assert slept is not None and json.loads(slept.result) == {"slept": 0.01}
    failed = fake.result_for("t3")
    assert failed is not None and failed.retryable
    assert failed.error.startswith("DemoFailure: demo failure")
    invalid = fake.result_for("t4")
    assert invalid is not None and not invalid.retryable
    timed_out = fake.result_for("t5")
    assert timed_out is not None and timed_out.outcome == pb.TASK_OUTCOME_TIMED_OUT


async def test_welcome_lost_abandons_resumed_work() -> None:
    first = FakeCoordinator()
    server, address = await serve(first)
    port = int(address.rsplit(":", 1)[1])
    worker = Worker(address)
    started = asyncio.Event()
    abandoned = asyncio.Event()

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            abandoned.set()
            raise

    second = FakeCoordinator()
    second.welcome_lost = [pb.Lease(task_id="t1", attempt=1, epoch=7)]
    try:
        async with running(worker):
            first.stream.assign(assignment("t1", "hang"))
            async with asyncio.timeout(5):
                await started.wait()
            await server.stop(None)
            server, _ = await serve(second, port)
            async with asyncio.timeout(5):
                await abandoned.wait()
            hello = second.stream.hello
            assert hello is not None and keys_of(hello.in_flight) == {("t1", 1)}
            # The slot is free again, and nothing is reported for the lost lease.
            await eventually(lambda: second.stream.granted == 10, what="credit for the slot")
            await eventually(lambda: second.stream.of("heartbeat"), what="a heartbeat")
            assert second.results() == []
    finally:
        await server.stop(None)


async def test_silent_coordinator_is_dropped(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    fake.answer_heartbeats = False
    worker = Worker(address)
    worker.register("work", lambda ctx, payload: None)
    async with running(worker):
        # No HeartbeatAck for 2.5 intervals: the worker gives up on the stream.
        await eventually(lambda: len(fake.streams) >= 2, timeout=5, what="a new stream")
        assert fake.streams[0].ended


async def test_silence_is_noticed_well_before_the_lease_expires(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    # Heartbeat 1 s, lease 2.5 s: the old rule (3 heartbeats + 1 s) waited 4 s, past the
    # lease; the liveness timeout from Welcome is 1.5 s (lease minus one interval).
    fake, address = coordinator
    fake.heartbeat_interval = 1.0
    fake.lease_duration = 2.5
    fake.answer_heartbeats = False
    worker = Worker(address)
    worker.register("work", lambda ctx, payload: None)
    async with running(worker):
        loop = asyncio.get_running_loop()
        began = loop.time()
        await eventually(lambda: len(fake.streams) >= 2, timeout=5, what="a new stream")
        assert loop.time() - began < 2.5, "the lease would have expired first"
        # The new session says Hello (listing what the worker holds) while leases stand.
        await eventually(lambda: fake.streams[1].hello is not None, what="a new Hello")


async def test_the_first_heartbeat_comes_at_a_random_moment_of_the_first_interval(
    coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers that connected together must not heartbeat in step (issue 19): the first
    # heartbeat is at interval x random(), here the draw 0: at once, not 30 s after the
    # Welcome.
    fake, address = coordinator
    fake.heartbeat_interval = 30.0
    fake.lease_duration = 120.0
    monkeypatch.setattr(random, "random", lambda: 0.0)
    worker = Worker(address)
    worker.register("work", lambda ctx, payload: None)
    async with running(worker):
        await eventually(lambda: fake.stream.of("heartbeat"), timeout=5, what="a heartbeat")


async def test_the_liveness_timeout_the_coordinator_names_is_used(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    # Heartbeat 1 s and lease 30 s would give 2.5 s by the worker's own rule; the
    # coordinator says 1.2 s (what it waits before evicting), and the worker uses that.
    fake, address = coordinator
    fake.heartbeat_interval = 1.0
    fake.lease_duration = 30.0
    fake.liveness_timeout = 1.2
    fake.answer_heartbeats = False
    worker = Worker(address)
    worker.register("work", lambda ctx, payload: None)
    async with running(worker):
        loop = asyncio.get_running_loop()
        began = loop.time()
        await eventually(lambda: len(fake.streams) >= 2, timeout=5, what="a new stream")
        assert loop.time() - began < 2.2, "the worker waited its own 2.5 s"


async def test_worker_id_in_use_stops_the_worker_with_one_clear_error(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    info = error_details_pb2.ErrorInfo(
        reason="WORKER_ID_IN_USE", domain="conveyor.dev", metadata={"worker_id": "w-1"}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    fake.refuse = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="worker id in use", details=[detail]
    )
    worker = Worker(address, worker_id="w-1")
    worker.register("work", lambda ctx, payload: None)
    async with asyncio.timeout(5):
        with pytest.raises(WorkerIdInUseError) as caught:
            await worker.run(install_signal_handlers=False)
    assert caught.value.worker_id == "w-1"
    assert "another live worker process uses it" in str(caught.value)
    assert len(fake.streams) == 1  # no retrying: it is a misconfiguration
    assert not worker.running


async def test_handler_errors_are_sanitised(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    worker = Worker(address)

    @worker.task("nul", raw=True)
    async def nul(ctx: TaskContext, payload: bytes) -> bytes:
        raise NonRetryableError("bad \x00 byte and \udcff surrogate")

    async with running(worker):
        fake.stream.assign(assignment("t1", "nul"))
        await eventually(fake.results, what="a result")
    result = fake.result_for("t1")
    assert result is not None and result.outcome == pb.TASK_OUTCOME_FAILED
    assert result.error == "NonRetryableError: bad \\x00 byte and ? surrogate"


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if "refused the result" in r.getMessage() or "is not kept" in r.getMessage()
    ]


async def test_refusals_of_cancelled_tasks_are_no_warning(
    coordinator: tuple[FakeCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, address = coordinator
    fake.auto_ack = False
    worker = Worker(address)

    @worker.task("hang")
    async def hang(ctx: TaskContext, payload: Any) -> None:
        await asyncio.Event().wait()

    @worker.task("quick")
    async def quick(ctx: TaskContext, payload: Any) -> str:
        return "done"

    caplog.set_level(logging.INFO, logger="conveyor.worker")
    refused = "lease is not current: the task finished, was cancelled or was leased again"
    async with running(worker):
        stream = fake.stream
        hung, done, other = (
            assignment("t1", "hang"),
            assignment("t2", "quick"),
            assignment("t3", "quick"),
        )
        stream.assign(hung, done, other)
        await eventually(lambda: keys(fake.results()) >= {("t2", 1), ("t3", 1)}, what="results")
        # t1 cancelled while running; t2 cancelled after it finished; t3 not cancelled.
        stream.send(cancel_tasks=pb.CancelTasks(leases=[hung.lease, done.lease]))
        await eventually(lambda: fake.result_for("t1"), what="the cancelled result")
        stream.send(
            result_acks=pb.ResultAcks(
                acks=[
                    pb.ResultAck(lease=a.lease, accepted=False, reason=refused)
                    for a in (hung, done, other)
                ]
            )
        )
        await eventually(
            lambda: (
                sum(r.getMessage().startswith(("coordinator", "task")) for r in caplog.records) >= 3
            ),
            what="three refusals logged",
        )
    said = {
        r.getMessage().split()[1 if r.getMessage().startswith("task ") else 6]: (
            r.levelno,
            r.getMessage(),
        )
        for r in _refusals(caplog)
    }
    # Issue 20, break 7: a cancelled task's refusal says it was cancelled, not that the
    # coordinator refused its result ("lease is not current" reads like a fault).
    assert {task: level for task, (level, _) in said.items()} == {
        "t1": logging.INFO,
        "t2": logging.INFO,
        "t3": logging.WARNING,
    }
    for task in ("t1", "t2"):
        assert said[task][1] == f"task {task} attempt 1 was cancelled: its result is not kept"
    assert "refused the result of task t3" in said["t3"][1] and refused in said["t3"][1]


async def test_sync_handler_ignoring_cancellation_keeps_its_slot(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address, concurrency=1)
    proceed = threading.Event()

    @worker.task("stubborn")
    def stubborn(ctx: TaskContext, payload: Any) -> None:
        assert proceed.wait(5)  # ignores ctx.is_cancelled()

    async with running(worker):
        fake.stream.assign(assignment("t1", "stubborn", timeout=0.05))
        # Reported without waiting for the thread...
        await eventually(fake.results, what="the timeout result")
        result = fake.result_for("t1")
        assert result is not None and result.outcome == pb.TASK_OUTCOME_TIMED_OUT
        # ...and, once acknowledged, the lease is gone from heartbeats; but no credit comes
        # back while the thread is busy.
        stream = fake.stream
        await eventually(
            lambda: stream.of("heartbeat") and not stream.of("heartbeat")[-1].leases,
            what="a heartbeat without the lease",
        )
        assert stream.granted == 1
        proceed.set()
        await eventually(lambda: fake.stream.granted == 2, what="credit after the thread")


async def test_oversized_result_becomes_a_failure(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    worker = Worker(address)

    @worker.task("huge", raw=True)
    async def huge(ctx: TaskContext, payload: bytes) -> bytes:
        return b"x" * (5 << 20)

    async with running(worker):
        fake.stream.assign(assignment("t1", "huge"))
        await eventually(fake.results, what="a result")
    result = fake.result_for("t1")
    assert result is not None and result.outcome == pb.TASK_OUTCOME_FAILED
    assert not result.retryable and "result is too large (5242880 bytes" in result.error


async def test_drain_gives_up_on_acks_when_the_coordinator_is_gone(
    coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.worker import _worker

    monkeypatch.setattr(_worker, "RESULT_ACK_TIMEOUT", 0.2)
    fake, address = coordinator
    fake.auto_ack = False
    worker = Worker(address, grace_period=5)

    @worker.task("work")
    async def work(ctx: TaskContext, payload: Any) -> None:
        return None

    async with running(worker) as task:
        fake.stream.assign(assignment("t1"))
        await eventually(fake.results, what="the result")
        worker.shutdown()
        async with asyncio.timeout(5):
            await task


async def test_encrypted_payloads_and_results(coordinator: tuple[FakeCoordinator, str]) -> None:
    """With a codec the handler sees the plaintext and its content type; results leave
    sealed to their task; a payload that does not open fails for good, without running."""
    from conveyor.transport import Binding, EncryptionCodec, KeyRing
    from conveyor.transport._encryption import envelope_key_id

    fake, address = coordinator
    ring = KeyRing.generate("k1")
    worker = Worker(address, codec=EncryptionCodec(ring))
    seen: list[tuple[Any, str]] = []

    @worker.task("add")
    def add(ctx: TaskContext, payload: dict[str, int]) -> int:  # sync: runs in a thread
        seen.append((payload, ctx.content_type))
        return payload["a"] + payload["b"]

    @worker.task("echo", raw=True)
    async def echo(ctx: TaskContext, payload: bytes) -> bytes:
        return payload

    def sealed(
        task_type: str, task_id: str, data: bytes, content_type: str = "application/json"
    ) -> bytes:
        # assignment() gives each task the idempotency key "key-<id>": bound to it.
        binding = Binding.payload(task_type, task_id=task_id, idempotency_key=f"key-{task_id}")
        return ring.seal(data, content_type, binding)

    async with running(worker):
        fake.stream.assign(
            assignment("t1", "add", sealed("add", "t1", b'{"a": 2, "b": 3}')),
            assignment("t2", "echo", sealed("echo", "t2", b"\x00raw", "application/octet-stream")),
            # Sealed for another type: replayed as "add", it must not open.
            assignment("t3", "add", sealed("echo", "t3", b'{"a": 1, "b": 1}')),
            assignment("t4", "add", b'{"a": 1, "b": 1}'),  # plaintext
            # Sealed for task t1: moved onto t5, it must not open.
            assignment("t5", "add", sealed("add", "t1", b'{"a": 2, "b": 3}')),
        )
        await eventually(lambda: len(fake.results()) == 5, what="five results")

    assert seen == [({"a": 2, "b": 3}, "application/json")]
    ok = fake.result_for("t1")
    assert ok is not None and ok.outcome == pb.TASK_OUTCOME_SUCCEEDED
    assert envelope_key_id(ok.result) == "k1"
    assert ring.open(ok.result, Binding.result("add", "t1")) == (b"5", "application/json")
    raw = fake.result_for("t2")
    assert raw is not None
    assert ring.open(raw.result, Binding.result("echo", "t2")) == (
        b"\x00raw",
        "application/octet-stream",
    )
    for task_id, reason in (
        ("t3", "cannot decrypt task t3"),
        ("t4", "is not encrypted"),
        ("t5", "cannot decrypt task t5"),
    ):
        failed = fake.result_for(task_id)
        assert failed is not None and failed.outcome == pb.TASK_OUTCOME_FAILED
        assert not failed.retryable and reason in failed.error, failed.error


async def test_a_payload_sealed_with_a_key_the_worker_lacks_goes_back(
    coordinator: tuple[FakeCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Hello names the keys the worker holds; a payload under another key is given back
    (KEY_UNAVAILABLE, its key named), said once per key, without running or failing."""
    from conveyor.transport import Binding, EncryptionCodec, KeyRing

    fake, address = coordinator
    ring, other = KeyRing.generate("k1"), KeyRing.generate("k2")
    worker = Worker(address, codec=EncryptionCodec(ring))
    ran: list[str] = []

    @worker.task("echo", raw=True)
    async def echo(ctx: TaskContext, payload: bytes) -> bytes:
        ran.append(ctx.task_id)
        return payload

    def sealed(task_id: str) -> bytes:
        binding = Binding.payload("echo", task_id=task_id, idempotency_key=f"key-{task_id}")
        return other.seal(b"x", "application/octet-stream", binding)

    async with running(worker):
        await eventually(lambda: fake.stream.hello, what="Hello")
        hello = fake.stream.hello
        assert hello is not None and list(hello.encryption_keys.key_ids) == ["k1"]
        fake.stream.assign(assignment("t1", "echo", sealed("t1")))
        fake.stream.assign(assignment("t2", "echo", sealed("t2")))
        await eventually(lambda: len(fake.results()) == 2, what="two results")
    assert ran == []
    for result in fake.results():
        assert (result.outcome, result.key_id) == (pb.TASK_OUTCOME_KEY_UNAVAILABLE, "k2")
        assert "'k2', which is not in the key ring" in result.error
    said = [r for r in caplog.records if "gives such tasks back" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR


async def test_a_worker_without_codec_names_no_keys_and_gives_sealed_payloads_back(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    from conveyor.transport import Binding, KeyRing

    fake, address = coordinator
    worker = Worker(address)

    @worker.task("echo", raw=True)
    async def echo(ctx: TaskContext, payload: bytes) -> bytes:
        return payload

    binding = Binding.payload("echo", task_id="t1", idempotency_key="key-t1")
    payload = KeyRing.generate("k1").seal(b"x", "application/octet-stream", binding)
    async with running(worker):
        await eventually(lambda: fake.stream.hello, what="Hello")
        hello = fake.stream.hello
        assert hello is not None and hello.HasField("encryption_keys")
        assert list(hello.encryption_keys.key_ids) == []
        fake.stream.assign(assignment("t1", "echo", payload))
        result = await eventually(lambda: fake.result_for("t1"), what="the result")
    assert (result.outcome, result.key_id) == (pb.TASK_OUTCOME_KEY_UNAVAILABLE, "k1")
    assert "has no key ring" in result.error


async def test_a_key_file_reread_is_told_to_the_coordinator(
    coordinator: tuple[FakeCoordinator, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.transport import EncryptionCodec, KeyRing, _encryption

    monkeypatch.setattr(_encryption, "_RELOAD_INTERVAL", 0.0)
    fake, address = coordinator
    path = tmp_path / "keys.json"
    ring = KeyRing.generate("k1")
    ring.save(path)
    worker = Worker(address, codec=EncryptionCodec.from_key_file(path))

    @worker.task("echo")
    async def echo(ctx: TaskContext, payload: Any) -> Any:
        return payload

    async with running(worker):
        await eventually(lambda: fake.stream.hello, what="Hello")
        ring.rotated("k2").save(path)
        told = await eventually(
            lambda: fake.stream.of("encryption_keys"), what="an EncryptionKeys message"
        )
    assert [list(m.key_ids) for m in told] == [["k1", "k2"]]


async def test_the_key_file_is_checked_off_the_event_loop(
    coordinator: tuple[FakeCoordinator, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hello and every heartbeat ask the codec for its keys, which checks its key file (a
    stat, and a read when it changed): never on the event loop, which every task and the
    stream share (on Python 3.11 even ``isinstance(codec, KeyedCodec)`` reads the keys)."""
    from conveyor.transport import EncryptionCodec, KeyRing, _encryption

    fake, address = coordinator
    path = tmp_path / "keys.json"
    KeyRing.generate("k1").save(path)
    codec = EncryptionCodec.from_key_file(path)
    monkeypatch.setattr(_encryption, "_RELOAD_INTERVAL", 0.0)
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []  # one per check of the key file
    check = _encryption._file_version

    def watched(file: Any) -> Any:
        on_loop.append(threading.get_ident() == loop_thread)
        return check(file)

    monkeypatch.setattr(_encryption, "_file_version", watched)
    worker = Worker(address, codec=codec)
    worker.register("echo", lambda ctx, payload: payload)

    async with running(worker):
        await eventually(lambda: len(fake.stream.of("heartbeat")) >= 3, what="3 heartbeats")
    assert on_loop and not any(on_loop), on_loop


def _said_hello_on(fake: FakeCoordinator, streams: int) -> bool:
    """The worker's ``streams``-th stream has sent its Hello."""
    return len(fake.streams) == streams and bool(fake.stream.hello)
