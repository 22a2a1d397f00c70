"""One ``WorkerService.Connect`` stream: Hello/Welcome, then credit, heartbeats and results.

A session lives as long as its stream. It owns its loops (writer, reader, heartbeat,
credit, results) and cancels all of them when it ends, however it ends. Everything that
must survive a reconnect (running handlers, unacknowledged results) lives in the
:class:`~conveyor.worker._runtime.Runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable

import grpc
import grpc.aio
from google.protobuf import duration_pb2

from conveyor.transport import ConnectionOptions, error_from_rpc
from conveyor.transport._errors import (
    NotLeaderError,
    PermissionDeniedError,
    RPCError,
    UnauthenticatedError,
    WorkerIdInUseError,
)
from conveyor.transport._tls_hints import ANY_TLS, PLAINTEXT, tls_mismatch
from conveyor.v1 import worker_service_pb2 as pb
from conveyor.v1 import worker_service_pb2_grpc as pb_grpc
from conveyor.worker._health import LoopLag
from conveyor.worker._results import AttemptKey
from conveyor.worker._runtime import Runtime

__all__ = ["HelloInfo", "Session", "SessionEnd", "liveness_timeout"]

logger = logging.getLogger("conveyor.worker")

PROTOCOL_VERSION = 1
#: How long to wait for Welcome after opening the stream.
WELCOME_TIMEOUT = 10.0
#: Used when Welcome carries no heartbeat interval.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: Used when Welcome carries no lease duration (the coordinator's default).
DEFAULT_LEASE_DURATION = 30.0
#: Credits freed within this window go out as one Credit message.
CREDIT_COALESCE = 0.001
#: Results finished within this window go out as one Results message...
RESULT_BATCH_WINDOW = 0.002
#: ...of at most this many results (a worker's whole concurrency, 500 in the benchmark,
#: finishing in one burst went out in five messages of 100 each, every one a write, a
#: read of its acks and their dispatch on both sides; issue 19)...
RESULT_BATCH_MAX = 500
#: ...and about this many bytes, well under the coordinator's 64 MiB message limit (a
#: single result larger than this still goes alone; PendingResults refuses bigger ones).
RESULT_BATCH_BYTES = 8 << 20
#: What a result weighs beyond its result and error bytes, with room to spare (a lease
#: is a UUID, two integers and the framing: under 100 bytes).
_RESULT_OVERHEAD = 256
#: Outgoing messages waiting for the writer; a full queue makes senders wait (backpressure
#: from HTTP/2 flow control reaches the loops that produce messages).
OUTGOING_QUEUE_SIZE = 256
# Codes that mean "try again later"; anything else is the coordinator refusing the worker.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def first_heartbeat_delay(interval: float) -> float:
    """When a session's first heartbeat is due: at a random moment of its first interval.

    Workers that connect together (a fleet started at once, or every worker of a failed
    leader reconnecting to the next one within a second or two) would otherwise beat
    together for as long as their sessions last: all their heartbeats within the few
    seconds the connect took, every interval, and the coordinator idle in between. A
    random phase spreads them over the interval. Beating early is always allowed.
    """
    return interval * random.random()


@dataclasses.dataclass(frozen=True, slots=True)
class HelloInfo:
    """The parts of Hello that do not change between sessions."""

    worker_id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    task_types: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEnd:
    """How a session ended.

    Attributes:
        welcomed: The coordinator accepted the session (resets the reconnect backoff).
        reached: Some coordinator answered on this stream (any message or a status of its
            own); False when the address could not be reached at all.
        redirect: Set when the coordinator pointed at the leader: its address, or ""
            when it does not know it. ``None`` when there was no redirect.
        error: What broke the stream, for the log; ``None`` for an orderly end.
        rejected: The coordinator refused the worker (a status other than UNAVAILABLE,
            e.g. INVALID_ARGUMENT for a protocol violation): retrying goes on, but someone
            has to fix something.
        fatal: An error retrying cannot fix: the worker id is in use, the API key is
            missing, malformed, expired or revoked, or lacks the worker scope. The worker
            stops with it.
        unknown_key: The coordinator does not know the API key: a new key may still be on
            its way to this coordinator, so the worker retries for a while (the
            Connector's rule), then stops with this error.
    """

    welcomed: bool
    reached: bool = True
    redirect: str | None = None
    error: str | None = None
    rejected: bool = False
    fatal: RPCError | None = None
    unknown_key: UnauthenticatedError | None = None


class _SessionError(Exception):
    """The session cannot go on (protocol violation, silence, send stall)."""


def liveness_timeout(heartbeat_interval: float, lease_duration: float) -> float:
    """How long the coordinator may stay silent before the worker drops the stream.

    Every heartbeat is answered, so silence means the coordinator is gone, frozen or cut
    off. The worker must notice that well before its leases expire, so that it reconnects
    (to the next leader) and lists its running tasks in Hello while their leases still
    stand; otherwise the next leader reaps them and they run twice. Hence: two and a half
    heartbeat intervals (one late answer is no reason to reconnect), but at most the lease
    minus one interval, and never under one and a half intervals (an answer cannot come
    before the heartbeat it answers). With the defaults (heartbeat 10 s, lease 30 s) that
    is 20 s, leaving 10 s to reconnect before a lease renewed just before the silence runs
    out.
    """
    timeout = min(2.5 * heartbeat_interval, lease_duration - heartbeat_interval)
    return max(timeout, 1.5 * heartbeat_interval)


def _classify(
    exc: grpc.aio.AioRpcError, target: str, *, welcomed: bool, heard: bool, dialled: str = ""
) -> SessionEnd:
    """A SessionEnd for a stream that ended with an error status (``dialled``: how the
    worker dialled, for naming a TLS mismatch; see ``transport._tls_hints``)."""
    error = error_from_rpc(exc, address=target)
    if isinstance(error, NotLeaderError):
        # The coordinator may refuse the stream outright with NOT_LEADER instead of
        # answering with a Redirect message; both mean the same to the worker.
        return SessionEnd(welcomed=welcomed, redirect=error.leader_address or "")
    if isinstance(error, UnauthenticatedError) and error.problem in (None, "unknown"):
        return SessionEnd(welcomed=welcomed, error=str(error), rejected=True, unknown_key=error)
    if isinstance(error, WorkerIdInUseError | UnauthenticatedError | PermissionDeniedError):
        # The key's problem is permanent (missing, malformed, expired, revoked: a revoked
        # key stays revoked), and so is a missing scope or a taken id.
        return SessionEnd(welcomed=welcomed, error=str(error), fatal=error)
    # A bare UNAVAILABLE before any answer: gRPC could not connect at all.
    reached = heard or error.reason is not None or exc.code() != grpc.StatusCode.UNAVAILABLE
    details = exc.details() or "no details"
    mismatch = None if reached else tls_mismatch(details, target, dialled)
    if mismatch is not None:
        # Reached, and refused for a setting of ours: an error until the settings change.
        return SessionEnd(welcomed=welcomed, error=mismatch, rejected=True)
    if not reached:
        # gRPC's text nests the cause last ("failed to connect to all addresses; last
        # error: ...: Connection refused"); the cause is what a reader needs.
        return SessionEnd(welcomed=welcomed, reached=False, error=details.rsplit(": ", 1)[-1])
    return SessionEnd(
        welcomed=welcomed,
        error=f"{exc.code().name}: {details}",
        rejected=exc.code() not in _TRANSIENT_CODES,
    )


class Session:
    """One stream to one coordinator address; :meth:`run` returns when it ends."""

    def __init__(
        self,
        target: str,
        *,
        info: HelloInfo,
        runtime: Runtime,
        draining: bool,
        options: ConnectionOptions,
        on_welcome: Callable[[Session], None] | None = None,
    ) -> None:
        self.target = target
        self._on_welcome_callback = on_welcome
        self._info = info
        self._runtime = runtime
        self._draining = draining
        self._options = options
        self._outgoing: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue(OUTGOING_QUEUE_SIZE)
        self._credit_wanted = asyncio.Event()
        self._results_wanted = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._finished = asyncio.Event()
        self._welcomed = False
        self._closing = False
        self._write_closed = False
        self._drain_sent = False
        # Credit granted on this session that no assignment has used yet.
        self._outstanding = 0
        # The coordinator reads credit carried in Results (Welcome.credit_in_results).
        self._credit_in_results = False
        # The coordinator answers numbered Results messages as a whole
        # (Welcome.result_acks_by_sequence): the last number given, and the attempts each
        # message not answered yet carried (each result is in one message per session).
        self._acks_by_sequence = False
        self._sequence = 0
        self._sent: dict[int, list[AttemptKey]] = {}
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._liveness = liveness_timeout(DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LEASE_DURATION)
        self._last_heard = 0.0
        self._heard = False  # any message from the coordinator on this stream
        # The encryption key ids last named to the coordinator (None: not named).
        self._keys_named: tuple[str, ...] | None = None
        self._loop_lag = LoopLag()
        self.session_id = ""

    @property
    def welcomed(self) -> bool:
        """Whether the coordinator accepted this session."""
        return self._welcomed

    # -- control from the worker -------------------------------------------------------

    def drain(self) -> None:
        """Stop granting credit and tell the coordinator (Drain) as soon as welcomed."""
        self._draining = True
        self._credit_wanted.set()  # the credit loop sends Drain{}

    async def close(self) -> None:
        """Write what is pending, half-close, and wait for the coordinator to end the stream.

        Unbounded: the caller bounds it (``asyncio.timeout``) and, past that, cancels the
        task running :meth:`run`.
        """
        self._closing = True
        if not self._welcomed:
            # Nothing to flush, and no point waiting for a Welcome that may never come.
            return
        if not self._write_closed and not self._finished.is_set():
            # Results go out now rather than after the batching window, and before the
            # half-close (the writer drops anything queued after it).
            while request := self._take_results():
                await self._outgoing.put(request)
            await self._outgoing.put(None)
        await self._finished.wait()

    # -- RuntimeListener ---------------------------------------------------------------

    def results_ready(self) -> None:
        """Wake the results loop (called by the runtime, once per result)."""
        wanted = self._results_wanted
        if not wanted.is_set():
            wanted.set()
        if self._runtime.pending.unsent_count() >= RESULT_BATCH_MAX:
            self._batch_full.set()

    def slots_changed(self) -> None:
        """Wake the credit loop (called by the runtime)."""
        self._credit_wanted.set()

    # -- the session -------------------------------------------------------------------

    async def run(self) -> SessionEnd:
        """Open the stream, converse until it ends, and clean up everything it started."""
        # A fresh channel per session: a Redirect points somewhere else, and reconnecting
        # (with backoff, across addresses) is the Connector's job, not gRPC's.
        channel = self._options.open_channel(self.target)
        tasks: list[asyncio.Task[SessionEnd | None]] = []
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse] | None = None
        try:
            stub = pb_grpc.WorkerServiceStub(channel)
            call = stub.Connect(metadata=self._options.call_metadata() or None)
            end = await self._converse(call, tasks)
        except grpc.aio.AioRpcError as exc:
            dialled = PLAINTEXT if self._options.credentials is None else ANY_TLS
            end = _classify(
                exc, self.target, welcomed=self._welcomed, heard=self._heard, dialled=dialled
            )
        except TimeoutError:
            end = SessionEnd(welcomed=self._welcomed, error="timed out waiting for Welcome")
        except _SessionError as exc:
            end = SessionEnd(welcomed=self._welcomed, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug here must not kill a worker whose handlers are still running:
            # log it loudly and let the caller reconnect.
            logger.exception("worker session to %s failed unexpectedly", self.target)
            end = SessionEnd(welcomed=self._welcomed, error=repr(exc))
        finally:
            self._runtime.detach(self)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if call is not None:
                call.cancel()
            await channel.close(grace=None)
            self._finished.set()
        return end

    async def _converse(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        tasks: list[asyncio.Task[SessionEnd | None]],
    ) -> SessionEnd:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._write_loop(call), name="conveyor-session-writer")
        tasks.append(writer)
        credits = 0 if self._draining else max(0, self._runtime.free_slots())
        in_flight = self._runtime.held_leases()
        keys = await self._runtime.encryption_keys()
        self._keys_named = None if keys is None else tuple(keys.key_ids)
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id=self._info.worker_id,
            hostname=self._info.hostname,
            pid=self._info.pid,
            queues=self._info.queues,
            task_types=self._info.task_types,
            credits=credits,
            in_flight=in_flight,
            resume_token=self._runtime.resume_token,
            encryption_keys=keys,
        )
        self._outstanding = credits
        await self._outgoing.put(pb.ConnectRequest(hello=hello))

        async with asyncio.timeout(WELCOME_TIMEOUT):
            first = await call.read()
        if first is grpc.aio.EOF:
            raise _SessionError("the coordinator closed the stream before Welcome")
        self._heard = True
        assert isinstance(first, pb.ConnectResponse)
        kind = first.WhichOneof("message")
        if kind == "redirect":
            return SessionEnd(welcomed=False, redirect=first.redirect.leader_address)
        if kind != "welcome":
            raise _SessionError(f"expected Welcome, got {kind or 'an empty message'}")
        self._on_welcome(first.welcome, len(in_flight))

        for name, coro in (
            ("reader", self._read_loop(call)),
            ("heartbeat", self._heartbeat_loop()),
            ("loop-lag", self._loop_lag.run()),
            ("credit", self._credit_loop()),
            ("results", self._results_loop()),
        ):
            tasks.append(loop.create_task(coro, name=f"conveyor-session-{name}"))
        self._runtime.attach(self)
        if self._on_welcome_callback is not None:
            self._on_welcome_callback(self)

        # Whichever loop ends first ends the session: the reader on EOF or Redirect,
        # any loop on error. The writer alone may end early: after an orderly half-close.
        pending: set[asyncio.Task[SessionEnd | None]] = set(tasks)
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outcome = task.result()  # re-raises what broke the loop
                if outcome is not None:
                    return outcome
                if task is not writer:
                    raise _SessionError(f"{task.get_name()} stopped unexpectedly")

    def _on_welcome(self, welcome: pb.Welcome, resumed: int) -> None:
        self._welcomed = True
        self.session_id = welcome.session_id
        self._credit_in_results = welcome.credit_in_results
        self._acks_by_sequence = welcome.result_acks_by_sequence
        if welcome.resume_token:
            self._runtime.resume_token = welcome.resume_token
        interval = welcome.heartbeat_interval.ToTimedelta().total_seconds()
        if interval > 0:
            self._heartbeat_interval = interval
        lease = welcome.lease_duration.ToTimedelta().total_seconds()
        if lease <= 0:
            lease = DEFAULT_LEASE_DURATION
        told = welcome.liveness_timeout.ToTimedelta().total_seconds()
        # The coordinator says how long it waits before it evicts a silent worker; the
        # worker gives up on a silent coordinator after the same time. Older coordinators
        # do not say: then the same rule computed here.
        self._liveness = told if told > 0 else liveness_timeout(self._heartbeat_interval, lease)
        if self._liveness >= lease:
            # The coordinator's settings leave no room to notice silence before a lease
            # runs out; say so, since tasks may then run twice after a failover.
            logger.warning(
                "coordinator %s: lease duration %gs is too short for heartbeat interval %gs; "
                "leases may expire before this worker notices a silent coordinator",
                self.target,
                lease,
                self._heartbeat_interval,
            )
        self._last_heard = asyncio.get_running_loop().time()
        logger.info(
            "connected to coordinator %s (session %s, epoch %d, heartbeat %gs, lease %gs, "
            "%d resumed, %d lost)",
            self.target,
            welcome.session_id,
            welcome.epoch,
            self._heartbeat_interval,
            lease,
            resumed - len(welcome.lost),
            len(welcome.lost),
        )
        self._runtime.tenant = welcome.tenant
        self._runtime.abandon(welcome.lost)

    # -- the loops ---------------------------------------------------------------------

    async def _send(self, message: pb.ConnectRequest) -> None:
        if not self._outgoing.full():
            # Room for it: no wait to bound (a timeout armed and disarmed per message was
            # a timer of the loop per results message and per credit).
            self._outgoing.put_nowait(message)
            return
        try:
            async with asyncio.timeout(self._liveness):
                await self._outgoing.put(message)
        except TimeoutError:
            raise _SessionError("the coordinator stopped reading the stream") from None

    async def _write_loop(
        self, call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]
    ) -> None:
        while True:
            message = await self._outgoing.get()
            if self._write_closed:
                continue  # after the half-close; unsent results stay pending
            if message is None:
                await call.done_writing()
                self._write_closed = True
                return
            try:
                await call.write(message)
            except asyncio.InvalidStateError:
                # The call already ended; the reader reports its status, which says why.
                logger.debug("stream to %s ended while writing", self.target)
                return

    async def _read_loop(
        self, call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]
    ) -> SessionEnd:
        loop = asyncio.get_running_loop()
        runtime = self._runtime
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                if self._closing:
                    return SessionEnd(welcomed=True)
                return SessionEnd(welcomed=True, error="the coordinator ended the stream")
            assert isinstance(message, pb.ConnectResponse)
            self._last_heard = loop.time()
            self._heard = True
            kind = message.WhichOneof("message")
            if kind == "assignments":
                assignments = message.assignments.assignments
                self._outstanding -= len(assignments)
                if self._outstanding < 0:
                    logger.warning(
                        "coordinator sent %d assignment(s) beyond the credit granted",
                        -self._outstanding,
                    )
                    self._outstanding = 0
                runtime.accept_all(assignments)
            elif kind == "result_acks":
                result_acks = message.result_acks
                if result_acks.sequence:
                    keys = self._sent.pop(result_acks.sequence, None)
                    if keys is None:
                        logger.debug("acks for unknown results message %d", result_acks.sequence)
                        keys = []
                    runtime.pending.ack_message(keys, result_acks.acks)
                else:
                    runtime.ack(result_acks.acks)
            elif kind == "cancel_tasks":
                runtime.cancel(message.cancel_tasks.leases)
            elif kind == "heartbeat_ack":
                runtime.abandon(message.heartbeat_ack.lost)
            elif kind == "redirect":
                return SessionEnd(welcomed=True, redirect=message.redirect.leader_address)
            elif kind == "drain":
                runtime.on_drain_requested(message.drain.reason)
            elif kind == "welcome":
                logger.warning("ignoring a second Welcome on session %s", self.session_id)
            else:
                # A newer coordinator may send messages this SDK does not know.
                logger.debug("ignoring unknown coordinator message %r", kind)

    async def _heartbeat_loop(self) -> None:
        """Heartbeats every interval, and the watchdog on the coordinator's silence.

        It wakes for whichever comes first, the next heartbeat or the moment the silence
        would pass the liveness timeout, so silence is noticed on time, not at the next
        heartbeat after it.
        """
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + first_heartbeat_delay(self._heartbeat_interval)
        while True:
            await asyncio.sleep(
                max(0.0, min(next_beat, self._last_heard + self._liveness) - loop.time())
            )
            now = loop.time()
            silent = now - self._last_heard
            if silent >= self._liveness:
                raise _SessionError(
                    f"no message from the coordinator for {silent:.1f}s (liveness timeout "
                    f"{self._liveness:g}s)"
                )
            if now >= next_beat:
                next_beat = now + self._heartbeat_interval
                await self._send(pb.ConnectRequest(heartbeat=self._heartbeat()))
                # After the heartbeat: a slow key file must not delay the lease renewal.
                await self._name_new_keys()

    def _heartbeat(self) -> pb.Heartbeat:
        """A heartbeat: the leases to renew, and the load (once per heartbeat, never per
        task) the coordinator judges this worker's health by."""
        runtime = self._runtime
        lag = duration_pb2.Duration()
        lag.FromNanoseconds(int(self._loop_lag.take() * 1e9))
        finished, failed = runtime.take_outcomes()
        return pb.Heartbeat(
            leases=runtime.held_leases(),
            in_flight=runtime.running_count(),
            free_slots=max(0, runtime.free_slots()),
            loop_lag=lag,
            finished=finished,
            failed=failed,
        )

    async def _name_new_keys(self) -> None:
        """Tells the coordinator when the encryption keys changed (a key file reread), so
        tasks of a key just added reach this worker and those of a key removed do not."""
        keys = await self._runtime.encryption_keys()
        if keys is None or tuple(keys.key_ids) == self._keys_named:
            return
        logger.info(
            "encryption keys changed to %s; telling coordinator %s",
            ", ".join(keys.key_ids) or "none",
            self.target,
        )
        self._keys_named = tuple(keys.key_ids)
        await self._send(pb.ConnectRequest(encryption_keys=keys))

    async def _credit_loop(self) -> None:
        while True:
            await self._credit_wanted.wait()
            # Let the other slots freed in the same instant join this Credit message.
            await asyncio.sleep(CREDIT_COALESCE)
            self._credit_wanted.clear()
            if self._draining:
                if not self._drain_sent:
                    self._drain_sent = True
                    await self._send(pb.ConnectRequest(drain=pb.Drain()))
                continue
            if self._credit_in_results and self._runtime.pending.unsent_count():
                # Results are on their way (the results loop was woken when each was
                # added): the credit goes in their message, which takes it when it is
                # built, instead of a Credit message of its own beside it (a write on
                # each side and a read on the coordinator's per message; issue 19).
                continue
            grant = self._runtime.free_slots() - self._outstanding
            if grant > 0:
                self._outstanding += grant
                await self._send(pb.ConnectRequest(credit=pb.Credit(credits=grant)))

    async def _results_loop(self) -> None:
        while True:
            await self._results_wanted.wait()
            if self._runtime.pending.unsent_count() < RESULT_BATCH_MAX:
                # Give results finishing right after this one a moment to share the message.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESULT_BATCH_WINDOW):
                        await self._batch_full.wait()
            self._results_wanted.clear()
            self._batch_full.clear()
            while request := self._take_results():
                await self._send(request)
                self._runtime.record_runs()

    def _take_results(self) -> pb.ConnectRequest | None:
        """The next Results message, or None when every result was sent. The results
        are written into it in place (built as a TaskResult each and then copied into
        the message, a success cost the worker twice as much; issue 19)."""
        request = pb.ConnectRequest()
        # The result's bytes stand for its size: the lease and the rest are a few dozen
        # bytes (ByteSize, twice a result, was a tenth of the batching's CPU).
        results = request.results
        keys: list[AttemptKey] | None = [] if self._acks_by_sequence else None
        taken = self._runtime.pending.take_batch(
            results.results, RESULT_BATCH_MAX, RESULT_BATCH_BYTES, _RESULT_OVERHEAD, keys
        )
        if not taken:
            return None
        if keys is not None:
            # Answered as a whole: its acks name this number and only the refused results.
            self._sequence += 1
            results.sequence = self._sequence
            self._sent[self._sequence] = keys
        if self._credit_in_results and not self._draining and not self._closing:
            # The credit owed now travels with the results (see _credit_loop).
            grant = self._runtime.free_slots() - self._outstanding
            if grant > 0:
                self._outstanding += grant
                results.credits = grant
        return request
