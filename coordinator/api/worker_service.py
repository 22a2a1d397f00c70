"""``WorkerService.Connect``: one bidirectional stream per worker process.

A stream starts with Hello, checked in full (``validation.validate_hello``), then:

1. the worker id is taken. A live session with the same id refuses this one
   (WORKER_ID_IN_USE), unless the Hello presents that session's resume token: then it is
   the same process (a reconnect that overtook the old stream's end), the old session is
   retired, and this stream waits until the old one has settled its leases. Hostname and
   pid prove nothing (see ``sessions.py``);
2. its leases are resumed. The process's own (granted to the resume token it presents):
   those listed in ``Hello.in_flight`` are renewed, every other one goes back at once
   without using an attempt (the worker lists all it holds, so it never received those).
   Any other lease of the worker id was granted to another process, which may be running
   it: it goes back counted (LEASE_EXPIRED), even if listed. Welcome lists the listed
   leases that are not the worker's, and the resume token: the one presented if it held
   a lease or the live session, else a new one;
3. the stream runs as three loops: receive (this handler's), send (draining the
   session's outbox, see ``sessions.py``) and ack (answering each Results or Heartbeat
   after its group commit, in order). A full ack queue stops the receive loop, which is
   the backpressure the worker feels.

Each side expects to hear from the other at least every heartbeat interval and gives up
after ``liveness_timeout`` (told to the worker in Welcome). A worker silent that long, or
that does not take a message within it, or whose outbox overflows, is evicted: logged,
listed in ``GetClusterStatus.recent_evictions``, its stream cut (UNAVAILABLE), and its
leases taken back at once: those never written to its stream without using an attempt,
the rest as LEASE_EXPIRED (they may have run). Whenever a stream ends, assignments still
in its outbox go back at once, not counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.api import validation
from conveyor.coordinator.api.interceptors.chain import Undecodable
from conveyor.coordinator.api.validation import MAX_CREDIT, ValidHello
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch.health import WorkerHealth
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.coordinator.errors import (
    FieldViolation,
    Overloaded,
    ProtocolViolation,
    WorkerIdInUse,
)
from conveyor.coordinator.lifecycle import leases, results
from conveyor.coordinator.lifecycle.batcher import Batcher
from conveyor.coordinator.lifecycle.leases import Dispatcher, Leases, Mapped
from conveyor.coordinator.lifecycle.results import ResultRecorder
from conveyor.observability.logs import log_context
from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc

_log = logging.getLogger("conveyor.coordinator.worker_service")

HELLO_TIMEOUT = 10.0
# Results/heartbeat batches awaiting their commit per stream; a full queue stops reading
# from the worker, which is the backpressure the worker feels.
ACK_QUEUE_SIZE = 64
FLUSH_ON_CLOSE_TIMEOUT = 10.0
# Longest a reconnect waits for its old session to settle its leases.
RETIRE_TIMEOUT = 10.0
# Longest an ending stream waits for the write in progress.
SENDER_STOP_TIMEOUT = 5.0

# The context the stream's own done-callbacks run in: they read no context variable, and
# without one given each add_done_callback copies the caller's.
_CALLBACKS = contextvars.Context()

Context = grpc.aio.ServicerContext[
    worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
]


@dataclass
class _PendingAcks:
    """One Results or Heartbeat message waiting for its commit."""

    results: bool
    leases: Sequence[worker_service_pb2.Lease]
    mapped: Mapped
    future: asyncio.Future[list[bool]] | None
    # A numbered Results message (Results.sequence): answered with its number and its
    # refused results only; ``wire`` holds its results (their leases are read only for
    # a refusal) and ``leases`` is empty.
    sequence: int = 0
    wire: Sequence[worker_service_pb2.TaskResult] = ()


# The empty queue of every _Acks until its first message: never appended to.
_NO_PENDING: collections.deque[_PendingAcks] = collections.deque(maxlen=0)


class _Acks:
    """A stream's Results and Heartbeat messages waiting for their commit, answered in
    order, each as soon as its commit and those before it ended.

    No task of its own: the commits' done-callbacks answer (a task and its coroutine per
    stream were a tenth of a stream's objects, issue 19). At most ACK_QUEUE_SIZE wait; a
    full queue stops the receive loop (:meth:`add` waits), which is the backpressure the
    worker feels. A failed commit sets :attr:`failed`, which ends the stream: the worker
    reconnects (perhaps to another coordinator) and resends what was not acknowledged.
    """

    __slots__ = ("_pending", "_session", "_waiter", "failed")

    def __init__(self, session: WorkerSession) -> None:
        self._session = session
        # Made at the first message to answer after a commit: an idle worker's
        # heartbeats never need it, and a deque is 760 bytes (issue 19).
        self._pending: collections.deque[_PendingAcks] = _NO_PENDING
        # The receive loop waiting for room, or the close waiting for every answer.
        self._waiter: asyncio.Future[None] | None = None
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def idle(self) -> bool:
        """Nothing waits to be answered (an ack pushed now goes out in order)."""
        return not self._pending

    async def add(self, pending: _PendingAcks) -> None:
        """Queues a message's answer, waiting while ACK_QUEUE_SIZE wait already."""
        while len(self._pending) >= ACK_QUEUE_SIZE:
            await self._wait()
        if self._pending is _NO_PENDING:
            self._pending = collections.deque()
        self._pending.append(pending)
        if pending.future is None or pending.future.done():
            self._answer()
        else:
            pending.future.add_done_callback(self._committed)

    async def settled(self) -> None:
        """Returns once every queued message is answered (or the answers stopped)."""
        while self._pending and not self.failed.done():
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter

    def _committed(self, _: object) -> None:
        self._answer()

    def _answer(self) -> None:
        pending = self._pending
        while pending:
            head = pending[0]
            future = head.future
            if future is not None and not future.done():
                break
            pending.popleft()
            if future is not None and (future.cancelled() or future.exception() is not None):
                pending.clear()
                if not self.failed.done():
                    if future.cancelled():
                        self.failed.cancel()
                    else:
                        self.failed.set_exception(future.exception())  # type: ignore[arg-type]
                break
            stored = future.result() if future is not None else []
            if not self._session.push(_ack_message(head, stored)):
                pending.clear()  # the session is closing: nothing more is sent
                break
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _ack_message(pending: _PendingAcks, stored: list[bool]) -> worker_service_pb2.ConnectResponse:
    mapped = pending.mapped
    if pending.sequence:
        message = worker_service_pb2.ConnectResponse()
        result_acks = message.result_acks
        result_acks.sequence = pending.sequence
        if len(mapped.stored) != mapped.size or not all(stored):
            # Some were refused (malformed, unknown outcome, stale lease): only those are
            # named; every other result of the message was accepted.
            add = result_acks.acks.add
            for index, (ok, reason) in enumerate(mapped.answers(stored)):
                if not ok:
                    add(lease=pending.wire[index].lease, accepted=False, reason=reason)
        return message
    answers = mapped.answers(stored)
    if pending.results:
        message = worker_service_pb2.ConnectResponse()
        add = message.result_acks.acks.add
        for lease, (ok, reason) in zip(pending.leases, answers, strict=True):
            add(lease=lease, accepted=ok, reason=reason)
        return message
    return worker_service_pb2.ConnectResponse(
        heartbeat_ack=worker_service_pb2.HeartbeatAck(
            lost=[lease for lease, (ok, _) in zip(pending.leases, answers, strict=True) if not ok]
        )
    )


class _Watchdog:
    """A stream's two deadlines on one timer: a message from the worker at least every
    ``liveness`` seconds, and no write to it taking longer.

    Re-armed only when it fires (at most once per deadline, about every heartbeat
    interval), not per message: a timeout around every read and every write was two
    timers made and cancelled per heartbeat, 2,000 a second with 10,000 idle workers.
    """

    __slots__ = ("_interval", "_liveness", "_loop", "_session", "_timer", "heard", "writing")

    def __init__(self, session: WorkerSession, liveness: float, interval: float) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.heard = loop.time()
        """When the worker's last message arrived (the loop's clock)."""
        self.writing = 0.0
        """When the write in progress started; 0 while none is."""
        self._session = session
        self._liveness = liveness
        self._interval = interval
        self._timer = loop.call_at(self.heard + liveness, self._check)

    def _check(self) -> None:
        session, liveness = self._session, self._liveness
        if session.closed and session.ended.done():
            return
        # A timer may fire a little early (the loop's clock resolution).
        now = self._loop.time() + 0.001
        writing = self.writing
        if writing and now - writing >= liveness:
            session.write_stuck = True
            session.end(
                f"stopped reading its stream (a message waited {liveness:g}s)",
                evict="not_reading",
            )
            return
        if now - self.heard >= liveness:
            session.end(
                f"no message for {liveness:g}s (heartbeats are due every {self._interval:g}s)",
                evict="silent",
            )
            return
        due = self.heard + liveness
        if writing:
            due = min(due, writing + liveness)
        self._timer = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._timer.cancel()


# What an idle worker's heartbeat is answered with (one message for every stream: it is
# only ever serialized).
_EMPTY_HEARTBEAT_ACK = worker_service_pb2.ConnectResponse(
    heartbeat_ack=worker_service_pb2.HeartbeatAck()
)


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self, deps: Deps, dispatcher: Dispatcher, recorder: ResultRecorder, leases: Leases
    ) -> None:
        self._deps = deps
        self._dispatcher = dispatcher
        self._recorder = recorder
        self._leases = leases
        self._health = WorkerHealth(
            deps.sessions,
            max_loop_lag=deps.config.max_worker_loop_lag,
            heartbeat_interval=deps.config.heartbeat_interval,
            metrics=deps.metrics,
            wake=dispatcher.wake,
        )
        self._settling: set[asyncio.Task[None]] = set()

    # The generated base class expects a generator; writing through the context instead
    # lets the send and receive loops run independently of each other.
    async def Connect(  # type: ignore[override]
        self, request_iterator: object, context: Context
    ) -> None:
        hello = await self._read_hello(context)
        if hello is None:
            return
        tenant = request_context.current().tenant
        # Every line logged for this stream (its loops' tasks copy the context) names the
        # worker, as its own log field.
        with log_context(worker_id=hello.worker_id, tenant=tenant):
            await self._serve(hello, tenant, context)

    async def _serve(self, hello: ValidHello, tenant: str, context: Context) -> None:
        session = WorkerSession(
            session_id=str(uuid.uuid4()),
            worker_id=hello.worker_id,
            tenant=tenant,
            queues=hello.queues,
            task_types=hello.task_types,
            hostname=hello.hostname,
            pid=hello.pid,
            encryption_keys=hello.encryption_keys,
        )
        proven = await self._take_worker_id(session, hello.resume_token)
        failure: Exception | None = None
        try:
            lost = await self._leases.resume(session, hello, proven=proven)
            session.credit = hello.credits
            self._welcome(session, lost)
            self._deps.sessions.activate(session)
            self._deps.metrics.worker_connected(session.tenant)
            if not self._deps.office.leader:
                # Left office while this stream was opening (step_down missed it).
                self._redirect(session)
            if _log.isEnabledFor(logging.INFO):  # its arguments are built first
                _log.info(
                    "worker %s connected (host %s pid %d, queues %s, types %s, credit %d, "
                    "encryption keys %s)",
                    session.worker_id,
                    session.hostname,
                    session.pid,
                    ",".join(session.queues),
                    ",".join(session.task_types),
                    session.credit,
                    _keys_text(session.encryption_keys),
                )
            self._dispatcher.offer(session)
            await self._converse(session, context)
        except Exception as exc:
            failure = exc
        finally:
            # Settling writes to the store; it must finish even if this call is cancelled.
            settle = asyncio.get_running_loop().create_task(self._settle(session))
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
            await asyncio.shield(settle)
        if session.write_stuck:
            # A write is stuck on a peer that reads nothing: no status can follow it. Ended
            # as cancelled, the call is dropped by gRPC without one (the peer is not
            # listening anyway).
            raise asyncio.CancelledError(f"worker {session.worker_id}: {session.end_reason}")
        if failure is not None:
            raise failure
        if session.evicted:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"evicted: {session.end_reason}")

    async def wait_settled(self) -> None:
        """Waits for ended streams to settle their leases (before the pool closes)."""
        await asyncio.gather(*self._settling, return_exceptions=True)

    # -- opening ---------------------------------------------------------------------------

    async def _read_hello(self, context: Context) -> ValidHello | None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await context.read()
        except TimeoutError:
            raise ProtocolViolation(f"no Hello within {HELLO_TIMEOUT:.0f}s") from None
        if isinstance(first, Undecodable):
            raise ProtocolViolation(f"the first message cannot be decoded: {first.problem}")
        if not isinstance(first, worker_service_pb2.ConnectRequest):  # grpc.aio.EOF
            return None
        if first.WhichOneof("message") != "hello":
            raise ProtocolViolation("the first message on the stream must be Hello")
        return validation.validate_hello(first.hello)

    async def _take_worker_id(self, session: WorkerSession, resume_token: bytes) -> bool:
        """Reserves the worker id; whether ``resume_token`` proved the Hello is the process
        of the live session that held it."""
        registry = self._deps.sessions
        proven = False
        while (holder := registry.holder(session.tenant, session.worker_id)) is not None:
            if not holder.closed:
                if not holder.proven_by(resume_token):
                    raise WorkerIdInUse(
                        session.worker_id, self._deps.config.worker_liveness_timeout
                    )
                proven = True
                holder.end("replaced by a new stream from the same worker process")
                self._deps.metrics.worker_evicted("replaced")
            try:
                async with asyncio.timeout(RETIRE_TIMEOUT):
                    await holder.done.wait()
            except TimeoutError:
                _log.warning("worker %s: the old session did not settle in time", holder.worker_id)
                # Its leases are this session's to resume now; it must not release them
                # when it gets that far (nor halfway through, hence the lock).
                async with holder.releasing:
                    holder.superseded = True
                registry.remove(holder)
        registry.reserve(session)
        return proven

    def _welcome(self, session: WorkerSession, lost: list[worker_service_pb2.Lease]) -> None:
        cfg = self._deps.config
        session.push(
            worker_service_pb2.ConnectResponse(
                welcome=worker_service_pb2.Welcome(
                    session_id=session.session_id,
                    epoch=self._deps.office.epoch,
                    heartbeat_interval=convert.duration_ms(int(cfg.heartbeat_interval * 1000)),
                    lease_duration=convert.duration_ms(int(cfg.lease_duration * 1000)),
                    liveness_timeout=convert.duration_ms(int(cfg.worker_liveness_timeout * 1000)),
                    lost=lost,
                    tenant=session.tenant,
                    resume_token=session.resume_token,
                    credit_in_results=True,
                    result_acks_by_sequence=True,
                )
            )
        )

    # -- the stream ------------------------------------------------------------------------

    async def _converse(self, session: WorkerSession, context: Context) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._deps.config
        watch = _Watchdog(session, cfg.worker_liveness_timeout, cfg.heartbeat_interval)
        acks = _Acks(session)
        # One write at a time on the call: the sender's, or an idle heartbeat's ack that
        # the receive loop writes itself (see _receive_loop).
        writes = asyncio.Lock()
        receiver = loop.create_task(
            self._receive_loop(session, context, acks, watch, writes), name="worker-recv"
        )
        sender = loop.create_task(
            self._send_loop(session, context, watch, writes), name="worker-send"
        )
        loops = (receiver, sender)
        # Whichever ends first ends the conversation: a loop (the worker closed its side,
        # or it broke the stream), a failed commit, or the session ended from outside.
        # One future and a done-callback each, not asyncio.wait (its two coroutines, sets
        # and callbacks made and taken away again for every stream: issue 19).
        stop = loop.create_future()

        def stopped(_: object) -> None:
            if not stop.done():
                stop.set_result(None)

        for future in (receiver, sender, acks.failed, session.ended):
            future.add_done_callback(stopped, context=_CALLBACKS)
        try:
            await stop
            for future in (receiver, sender, acks.failed):
                if future.done():
                    future.result()  # raises what broke the stream
            if receiver.done() and not session.ended.done():
                # The worker closed its side: answer what it sent before letting go.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_ON_CLOSE_TIMEOUT):
                        await acks.settled()
                        if acks.failed.done():
                            acks.failed.result()  # a failed commit: the stream ends with it
                        session.finish("the worker closed its stream")
                        await asyncio.shield(sender)
        finally:
            # The write in progress finishes first (the sender's, or an ack the receive
            # loop writes): gRPC cannot end a call (with a status) while a write is still
            # on its way, and a write cannot be called back. The sender stops after it,
            # and once the session is closed the receive loop starts no other. Only a
            # worker that reads nothing keeps a write that long.
            for future in (receiver, sender, acks.failed, session.ended):
                future.remove_done_callback(stopped)
            watch.stop()
            session.end("the stream ended")
            if not session.write_stuck:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SENDER_STOP_TIMEOUT):
                        await asyncio.wait({sender})
                        await writes.acquire()
            receiver.cancel()
            if not sender.done() or watch.writing:
                session.write_stuck = True
            sender.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if not acks.failed.done():
                acks.failed.cancel()

    async def _receive_loop(
        self,
        session: WorkerSession,
        context: Context,
        acks: _Acks,
        watch: _Watchdog,
        writes: asyncio.Lock,
    ) -> None:
        """Returns when the worker closes its side (its silence is the watchdog's)."""
        cfg = self._deps.config
        tenant, worker_id = session.tenant, session.worker_id
        loop = asyncio.get_running_loop()
        while True:
            message = await context.read()
            watch.heard = loop.time()
            if isinstance(message, Undecodable):
                raise ProtocolViolation(f"a message cannot be decoded: {message.problem}")
            if not isinstance(message, worker_service_pb2.ConnectRequest):  # grpc.aio.EOF
                return
            kind = message.WhichOneof("message")
            if kind == "results":
                results_message = message.results
                if results_message.credits:
                    # Credit carried with the results (Welcome.credit_in_results): read
                    # first, as the Credit message it replaces came before them.
                    self._grant(session, results_message.credits, "Results.credits")
                wire = results_message.results
                mapped, outcomes = results.map_results(
                    tenant, worker_id, wire, max_result_bytes=cfg.max_payload_bytes
                )
                if mapped.missing_keys:
                    _lacks(session, mapped.missing_keys)
                    self._deps.sessions.rekeyed()
                future = await _enqueue(self._recorder.results, outcomes) if outcomes else None
                sequence = results_message.sequence
                if sequence:
                    # Answered as a whole (Welcome.result_acks_by_sequence): no lease
                    # read per result here, no ResultAck built per result at the answer.
                    await acks.add(_PendingAcks(True, (), mapped, future, sequence, wire))
                else:
                    await acks.add(_PendingAcks(True, [r.lease for r in wire], mapped, future))
            elif kind == "heartbeat":
                if await self._heartbeat(session, message.heartbeat, acks):
                    await _answer_idle(session, context, watch, writes)
            elif kind == "credit":
                self._grant(session, message.credit.credits, "Credit.credits")
            elif kind == "drain":
                session.draining = True
                _log.info("worker %s is draining", worker_id)
            elif kind == "encryption_keys":
                violations: list[FieldViolation] = []
                held = validation.check_key_ids(
                    message.encryption_keys, "encryption_keys.key_ids", violations
                )
                if violations:
                    raise ProtocolViolation(
                        f"invalid EncryptionKeys: {violations[0].field}: "
                        f"{violations[0].description}",
                        violations,
                    )
                session.encryption_keys = held
                self._deps.sessions.rekeyed()
                _log.info("worker %s now holds encryption keys %s", worker_id, _keys_text(held))
                if session.wants_work:
                    self._dispatcher.wake()  # tasks of a new key may be waiting
            else:
                raise ProtocolViolation(f"unexpected {kind or 'empty'} message after Hello")

    def _grant(self, session: WorkerSession, credits: int, field: str) -> None:
        """Credit from the worker: a Credit message's, or carried in Results."""
        if not 0 <= credits <= MAX_CREDIT or session.credit + credits > MAX_CREDIT:
            raise ProtocolViolation(
                f"{field} {credits} is out of range: a worker may hold at most "
                f"{MAX_CREDIT} credits (it holds {session.credit})"
            )
        session.credit += credits
        if session.wants_work:
            self._dispatcher.offer(session)

    async def _heartbeat(
        self,
        session: WorkerSession,
        heartbeat: worker_service_pb2.Heartbeat,
        acks: _Acks,
    ) -> bool:
        """Takes a heartbeat in; True when it is to be answered now with an empty ack
        (no leases, nothing before it still to answer), else its ack is queued."""
        self._health.heartbeat(session, heartbeat)
        wire_leases = heartbeat.leases
        if not wire_leases and acks.idle:
            return True
        mapped, keys = leases.map_leases(session.tenant, session.worker_id, wire_leases)
        future = await _enqueue(self._leases.renewals, keys) if keys else None
        await acks.add(_PendingAcks(False, list(wire_leases), mapped, future))
        return False

    async def _send_loop(
        self, session: WorkerSession, context: Context, watch: _Watchdog, writes: asyncio.Lock
    ) -> None:
        """Writes the outbox; returns when the session finished and its outbox is empty.
        A write that takes longer than the liveness timeout is the watchdog's."""
        while (item := await session.next_message()) is not None:
            message, size = item
            await _write(context, message, watch, writes)
            session.sent(size)
            if session.throttled and session.outbox_room > 0:
                session.throttled = False
                self._dispatcher.wake()

    # -- closing ---------------------------------------------------------------------------

    async def _settle(self, session: WorkerSession) -> None:
        """Takes back what the ended session cannot finish; then frees its worker id.

        The worker id stays reserved until then: a reconnect of the same process waits, so
        the release here never meets the leases it resumes (and when it stops waiting,
        ``superseded`` tells this session to leave them alone).
        """
        deps = self._deps
        deps.sessions.retire(session)
        undelivered = session.take_undelivered()
        released = 0
        try:
            if undelivered or session.evicted:
                async with deps.db.autocommit() as conn:
                    if undelivered:
                        await self._leases.release_undelivered(conn, undelivered)
                    if session.evicted:
                        released = await self._leases.release_evicted(conn, session)
        except Exception as exc:
            # Store down or fenced: the leases come back when they expire or when the
            # worker reconnects.
            _log.warning(
                "worker %s: could not take back its leases now: %r", session.worker_id, exc
            )
        finally:
            deps.sessions.remove(session)
            if session.evicted:
                deps.sessions.record_eviction(session, released + len(undelivered))
                deps.metrics.worker_evicted(session.eviction)
            session.done.set()
            _log.info(
                "worker %s disconnected%s",
                session.worker_id,
                f" ({session.end_reason})" if session.end_reason else "",
            )

    def step_down(self) -> None:
        """Sends every worker to the new leader; their streams end once that is written."""
        for session in self._deps.sessions:
            self._redirect(session)

    def _redirect(self, session: WorkerSession) -> None:
        session.push(
            worker_service_pb2.ConnectResponse(
                redirect=worker_service_pb2.Redirect(
                    leader_address=self._deps.office.leader_address()
                )
            )
        )
        session.finish("this coordinator no longer leads")


async def _answer_idle(
    session: WorkerSession, context: Context, watch: _Watchdog, writes: asyncio.Lock
) -> None:
    """Answers an idle worker's heartbeat (nothing to commit, no earlier message still to
    answer; 1,000 a second with 10,000 idle workers). With nothing queued to send either,
    the ack is written here, in order: the send loop stays asleep (else a wake-up, and its
    waiting objects made anew, per heartbeat: issue 19). Refused once the session is
    closing: then nothing more is sent anyway."""
    if not session.outbox_empty:
        session.push(_EMPTY_HEARTBEAT_ACK)
        return
    await _write(context, _EMPTY_HEARTBEAT_ACK, watch, writes, unless_closed=session)


async def _write(
    context: Context,
    message: worker_service_pb2.ConnectResponse,
    watch: _Watchdog,
    writes: asyncio.Lock,
    *,
    unless_closed: WorkerSession | None = None,
) -> None:
    """One write to the worker: one at a time (``writes``), timed by the watchdog, which
    ends a stream whose write takes longer than the liveness timeout. Skipped when
    ``unless_closed`` has closed by the time the write's turn comes."""
    async with writes:
        if unless_closed is not None and unless_closed.closed:
            return
        watch.writing = asyncio.get_running_loop().time()
        await context.write(message)
        watch.writing = 0.0


def _keys_text(keys: frozenset[str] | None) -> str:
    if keys is None:
        return "not named (any)"
    return ",".join(sorted(keys)) or "none"


def _lacks(session: WorkerSession, missing: set[str]) -> None:
    """The worker reported tasks it cannot open: it is given no more of those keys."""
    keys = session.encryption_keys
    if keys is None:
        # It did not name its keys, so none can be taken away: it may be given such a
        # task again (the SDK names its keys whenever it can report this).
        _log.warning(
            "worker %s cannot open tasks of encryption key(s) %s but did not name its keys "
            "in Hello: it may be given them again",
            session.worker_id,
            ",".join(sorted(missing)),
        )
        return
    lost = keys & missing
    if lost:
        session.encryption_keys = keys - lost
        _log.warning(
            "worker %s does not hold encryption key(s) %s after all; it is given no more of "
            "their tasks, which wait for a worker that holds them",
            session.worker_id,
            ",".join(sorted(lost)),
        )


async def _enqueue(batcher: Batcher[Sequence[Any], list[bool]], item: Sequence[Any]) -> Any:
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
