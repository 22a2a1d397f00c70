"""``WorkerService.Connect``: one bidirectional stream per worker process.

Each stream is split into a receive loop (this handler), a send loop draining the
session's outbox, and an ack loop that waits for group-committed results and heartbeats
and answers them in order. Nothing the worker sends can harm another worker's tasks:
malformed leases are refused one by one, and a stream that breaks the protocol is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.batcher import Batcher
from conveyor.coordinator.config import DEFAULT_QUEUE, DEFAULT_TENANT
from conveyor.coordinator.dispatcher import Dispatcher
from conveyor.coordinator.errors import (
    ConveyorError,
    Overloaded,
    ProtocolViolation,
    StoreUnavailable,
    to_status,
)
from conveyor.coordinator.results import ResultRecorder
from conveyor.coordinator.sessions import SessionRegistry, WorkerSession
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.validation import MAX_NAME_LENGTH
from conveyor.coordinator.watchers import TaskWatchers
from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc

_log = logging.getLogger("conveyor.coordinator.worker_service")

PROTOCOL_VERSION = 1
# A task id in canonical text form. Leases keep ids as text end to end (asyncpg encodes
# text to uuid): parsing a UUID object per result is measurable at 10k results/s.
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HELLO_TIMEOUT = 10.0
MAX_CREDIT = 100_000
# Results/heartbeat batches awaiting their commit per stream; a full queue stops reading
# from the worker, which is the backpressure the worker feels.
ACK_QUEUE_SIZE = 64
FLUSH_ON_CLOSE_TIMEOUT = 10.0

_OUTCOMES = {
    worker_service_pb2.TASK_OUTCOME_SUCCEEDED: store.OUTCOME_SUCCEEDED,
    worker_service_pb2.TASK_OUTCOME_FAILED: store.OUTCOME_FAILED,
    worker_service_pb2.TASK_OUTCOME_TIMED_OUT: store.OUTCOME_TIMED_OUT,
    worker_service_pb2.TASK_OUTCOME_CANCELLED: store.OUTCOME_CANCELLED,
}


@dataclass
class _PendingAcks:
    """One Results or Heartbeat message waiting for its commit.

    ``stored`` holds the positions (in ``leases``) of the entries sent to the store, whose
    answers ``future`` brings in that order; the other entries were refused up front, with
    the reason in ``refused``.
    """

    kind: str  # "results" or "heartbeat"
    leases: list[worker_service_pb2.Lease]
    stored: list[int]
    refused: dict[int, str]
    future: asyncio.Future[list[bool]] | None = None

    def answers(self, stored_answers: Sequence[bool]) -> list[tuple[bool, str]]:
        """(accepted, reason) for every lease, in order."""
        out: list[tuple[bool, str]] = [(False, "")] * len(self.leases)
        for index, reason in self.refused.items():
            out[index] = (False, reason)
        for index, ok in zip(self.stored, stored_answers, strict=True):
            out[index] = (ok, "" if ok else "lease is not current")
        return out


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        sessions: SessionRegistry,
        dispatcher: Dispatcher,
        recorder: ResultRecorder,
        watchers: TaskWatchers,
        *,
        fence: Callable[[], Fence],
        is_leader: Callable[[], bool],
        leader_address: Callable[[], str],
        heartbeat_interval: float,
        lease_seconds: float,
    ) -> None:
        self._pool = pool
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._recorder = recorder
        self._watchers = watchers
        self._fence = fence
        self._is_leader = is_leader
        self._leader_address = leader_address
        self._heartbeat_interval = heartbeat_interval
        self._lease_seconds = lease_seconds

    # The generated base class expects a generator; writing through the context instead
    # lets the send and receive loops run independently of each other.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
    ) -> None:
        try:
            await self._serve(context)
        except ConveyorError as exc:
            await context.abort_with_status(to_status(exc))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await context.abort_with_status(to_status(StoreUnavailable(str(exc))))

    async def _serve(
        self,
        context: grpc.aio.ServicerContext[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except TimeoutError:
            raise ProtocolViolation(f"no Hello within {HELLO_TIMEOUT:.0f}s") from None
        if not isinstance(first, worker_service_pb2.ConnectRequest):  # grpc.aio.EOF
            return
        if first.WhichOneof("message") != "hello":
            raise ProtocolViolation("the first message on the stream must be Hello")
        hello = first.hello
        self._check_hello(hello)
        if not self._is_leader():
            await context.write(
                worker_service_pb2.ConnectResponse(
                    redirect=worker_service_pb2.Redirect(leader_address=self._leader_address())
                )
            )
            return
        session = WorkerSession(
            session_id=str(uuid.uuid4()),
            worker_id=hello.worker_id,
            tenant=DEFAULT_TENANT,
            queues=tuple(hello.queues) or (DEFAULT_QUEUE,),
            task_types=tuple(hello.task_types),
            hostname=hello.hostname,
            pid=hello.pid,
        )
        lost = await self._resume(session, hello.in_flight)
        previous = self._sessions.add(session)
        if previous is not None:
            _log.info("worker %s reconnected; retiring its old session", session.worker_id)
        session.credit = hello.credits
        await context.write(
            worker_service_pb2.ConnectResponse(
                welcome=worker_service_pb2.Welcome(
                    session_id=session.session_id,
                    epoch=self._fence().epoch,
                    heartbeat_interval=convert.duration_ms(int(self._heartbeat_interval * 1000)),
                    lease_duration=convert.duration_ms(int(self._lease_seconds * 1000)),
                    lost=lost,
                )
            )
        )
        _log.info(
            "worker %s connected (host %s pid %d, queues %s, credit %d)",
            session.worker_id,
            session.hostname,
            session.pid,
            ",".join(session.queues),
            session.credit,
        )
        self._dispatcher.wake()
        acks: asyncio.Queue[_PendingAcks | None] = asyncio.Queue(ACK_QUEUE_SIZE)
        sender = asyncio.create_task(self._send_loop(session, context), name="worker-send")
        acker = asyncio.create_task(self._ack_loop(session, acks), name="worker-ack")
        try:
            await self._receive_loop(session, context, acks, acker)
            # The worker closed its side: answer what it sent before letting go.
            await acks.put(None)
            await asyncio.wait_for(asyncio.shield(acker), FLUSH_ON_CLOSE_TIMEOUT)
            await asyncio.wait_for(session.outbox.join(), FLUSH_ON_CLOSE_TIMEOUT)
        finally:
            self._sessions.remove(session)
            for task in (sender, acker):
                task.cancel()
            results = await asyncio.gather(sender, acker, return_exceptions=True)
            _log.info("worker %s disconnected", session.worker_id)
            for result in results:
                if isinstance(result, ConveyorError):
                    raise result

    def _check_hello(self, hello: worker_service_pb2.Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolViolation(
                f"protocol version {hello.protocol_version} is not supported; "
                f"this coordinator speaks {PROTOCOL_VERSION}"
            )
        if not hello.worker_id or len(hello.worker_id) > MAX_NAME_LENGTH:
            raise ProtocolViolation(f"Hello.worker_id must be 1 to {MAX_NAME_LENGTH} characters")
        if not 0 <= hello.credits <= MAX_CREDIT:
            raise ProtocolViolation(f"Hello.credits must be between 0 and {MAX_CREDIT}")

    async def _resume(
        self, session: WorkerSession, in_flight: Sequence[worker_service_pb2.Lease]
    ) -> list[worker_service_pb2.Lease]:
        """Keeps the leases of tasks the worker still runs; returns those it lost.

        Leases held by this worker id that it does not list were assigned to a stream that
        broke before they arrived; they are taken back at once instead of at lease expiry.
        """
        valid: list[store.LeaseRef] = []
        lost: list[worker_service_pb2.Lease] = []
        for lease in in_flight:
            ref = self._lease_ref(session, lease)
            if ref is None:
                lost.append(lease)
            else:
                valid.append(ref)
        fence = self._fence()
        async with self._pool.acquire() as conn, conn.transaction():
            await leadership.check_epoch(conn, fence)
            renewed = (
                await store.renew_leases(conn, valid, self._lease_seconds, fence)
                if valid
                else set()
            )
            released = await store.release_abandoned(
                conn, session.tenant, session.worker_id, sorted(renewed)
            )
        for ref in valid:
            if (ref.task_id, ref.attempt) not in renewed:
                lost.append(
                    worker_service_pb2.Lease(
                        task_id=ref.task_id, attempt=ref.attempt, epoch=ref.epoch
                    )
                )
        if released:
            _log.info(
                "took back %d tasks worker %s no longer runs", len(released), session.worker_id
            )
            self._watchers.changed(r["id"] for r in released)
        return lost

    @staticmethod
    def _lease_ref(
        session: WorkerSession, lease: worker_service_pb2.Lease
    ) -> store.LeaseRef | None:
        task_id = lease.task_id.lower()
        if not _TASK_ID.fullmatch(task_id):
            return None
        return store.LeaseRef(
            tenant=session.tenant,
            task_id=task_id,
            attempt=lease.attempt,
            epoch=lease.epoch,
            worker_id=session.worker_id,
        )

    async def _receive_loop(
        self,
        session: WorkerSession,
        context: grpc.aio.ServicerContext[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
        acks: asyncio.Queue[_PendingAcks | None],
        acker: asyncio.Task[None],
    ) -> None:
        while True:
            read = asyncio.ensure_future(context.read())
            done, _ = await asyncio.wait({read, acker}, return_when=asyncio.FIRST_COMPLETED)
            if acker in done:
                read.cancel()
                acker.result()  # raises what stopped it
                return
            message = read.result()
            if not isinstance(message, worker_service_pb2.ConnectRequest):  # grpc.aio.EOF
                return
            kind = message.WhichOneof("message")
            if kind == "credit":
                credits = message.credit.credits
                if not 0 <= credits <= MAX_CREDIT or session.credit + credits > MAX_CREDIT:
                    raise ProtocolViolation(f"credit {credits} is out of range")
                session.credit += credits
                if session.wants_work:
                    self._dispatcher.wake()
            elif kind == "results":
                await acks.put(await self._enqueue_results(session, message.results.results))
            elif kind == "heartbeat":
                await acks.put(await self._enqueue_renewals(session, message.heartbeat.leases))
            elif kind == "drain":
                session.draining = True
                _log.info("worker %s is draining", session.worker_id)
            else:
                raise ProtocolViolation(f"unexpected {kind or 'empty'} message after Hello")

    async def _enqueue_results(
        self, session: WorkerSession, results: Sequence[worker_service_pb2.TaskResult]
    ) -> _PendingAcks:
        pending = _PendingAcks("results", [r.lease for r in results], [], {})
        items: list[store.Outcome] = []
        for index, result in enumerate(results):
            ref = self._lease_ref(session, result.lease)
            outcome = _OUTCOMES.get(result.outcome)
            if ref is None or outcome is None:
                pending.refused[index] = (
                    "malformed task id" if ref is None else f"unknown outcome {result.outcome}"
                )
                continue
            pending.stored.append(index)
            items.append(
                store.Outcome(
                    lease=ref,
                    outcome=outcome,
                    result=result.result if outcome == store.OUTCOME_SUCCEEDED else None,
                    error=result.error[:10_000],
                    retryable=result.retryable and outcome != store.OUTCOME_CANCELLED,
                )
            )
        if items:
            pending.future = await _enqueue(self._recorder.results, items)
        return pending

    async def _enqueue_renewals(
        self, session: WorkerSession, leases: Sequence[worker_service_pb2.Lease]
    ) -> _PendingAcks:
        pending = _PendingAcks("heartbeat", list(leases), [], {})
        refs: list[store.LeaseRef] = []
        for index, lease in enumerate(leases):
            ref = self._lease_ref(session, lease)
            if ref is None:
                pending.refused[index] = "malformed task id"
            else:
                pending.stored.append(index)
                refs.append(ref)
        if refs:
            pending.future = await _enqueue(self._recorder.renewals, refs)
        return pending

    async def _ack_loop(
        self, session: WorkerSession, acks: asyncio.Queue[_PendingAcks | None]
    ) -> None:
        while True:
            pending = await acks.get()
            if pending is None:
                return
            try:
                stored = await pending.future if pending.future is not None else []
            except ConveyorError:
                raise
            except Exception as exc:
                # The store failed: close the stream so the worker reconnects (perhaps to
                # another coordinator) and resends what was not acknowledged.
                raise StoreUnavailable(str(exc)) from exc
            answers = pending.answers(stored)
            if pending.kind == "results":
                message = worker_service_pb2.ConnectResponse(
                    result_acks=worker_service_pb2.ResultAcks(
                        acks=[
                            worker_service_pb2.ResultAck(lease=lease, accepted=ok, reason=reason)
                            for lease, (ok, reason) in zip(pending.leases, answers, strict=True)
                        ]
                    )
                )
            else:
                message = worker_service_pb2.ConnectResponse(
                    heartbeat_ack=worker_service_pb2.HeartbeatAck(
                        lost=[
                            lease
                            for lease, (ok, _) in zip(pending.leases, answers, strict=True)
                            if not ok
                        ]
                    )
                )
            await session.send(message)

    @staticmethod
    async def _send_loop(
        session: WorkerSession,
        context: grpc.aio.ServicerContext[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
    ) -> None:
        while True:
            message = await session.outbox.get()
            try:
                await context.write(message)
            finally:
                session.outbox.task_done()

    def step_down(self) -> None:
        """Closes every worker stream; workers reconnect and find the new leader."""
        for session in self._sessions:
            session.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                session.outbox.put_nowait(
                    worker_service_pb2.ConnectResponse(
                        redirect=worker_service_pb2.Redirect(leader_address=self._leader_address())
                    )
                )


Entry = TypeVar("Entry")


async def _enqueue(
    batcher: Batcher[Sequence[Entry], list[bool]], item: Sequence[Entry]
) -> asyncio.Future[list[bool]]:
    """Enqueues one message's entries, waiting (not failing) while the batcher is full.

    Waiting here stops this stream's receive loop, which is the backpressure the worker
    feels; refusing would lose nothing but would make the worker resend needlessly.
    """
    delay = 0.005
    weight = len(item)
    while True:
        try:
            return batcher.enqueue(item, weight)
        except Overloaded:
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 2)
