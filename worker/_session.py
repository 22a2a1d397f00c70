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
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.v1 import worker_service_pb2_grpc as pb_grpc
from conveyor.worker._runtime import Runtime

__all__ = ["HelloInfo", "Session", "SessionEnd", "not_leader_address"]

logger = logging.getLogger("conveyor.worker")

PROTOCOL_VERSION = 1
#: How long to wait for Welcome after opening the stream.
WELCOME_TIMEOUT = 10.0
#: Used when Welcome carries no heartbeat interval.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: Credits freed within this window go out as one Credit message.
CREDIT_COALESCE = 0.001
#: Results finished within this window go out as one Results message...
RESULT_BATCH_WINDOW = 0.002
#: ...of at most this many results...
RESULT_BATCH_MAX = 100
#: ...and about this many bytes, under gRPC's default 4 MiB receive limit (a single
#: result larger than this still goes alone; the runtime refuses to produce bigger ones).
RESULT_BATCH_BYTES = 3 << 20
#: Outgoing messages waiting for the writer; a full queue makes senders wait (backpressure
#: from HTTP/2 flow control reaches the loops that produce messages).
OUTGOING_QUEUE_SIZE = 256
#: Assignments batch many payloads into one message; allow more than gRPC's default 4 MiB.
MAX_RECEIVE_MESSAGE_BYTES = 64 << 20

_ERROR_DOMAIN = "conveyor.dev"
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
        redirect: Set when the coordinator pointed at the leader: its address, or ""
            when it does not know it. ``None`` when there was no redirect.
        error: What broke the stream, for the log; ``None`` for an orderly end.
        rejected: The coordinator refused the worker (a status other than UNAVAILABLE,
            e.g. INVALID_ARGUMENT for a protocol violation or UNAUTHENTICATED): retrying
            goes on, but someone has to fix something.
    """

    welcomed: bool
    redirect: str | None = None
    error: str | None = None
    rejected: bool = False


class _SessionError(Exception):
    """The session cannot go on (protocol violation, silence, send stall)."""


def not_leader_address(error: grpc.aio.AioRpcError) -> str | None:
    """The leader's address from a NOT_LEADER status, or ``None`` for other errors.

    The coordinator may refuse the stream outright with UNAVAILABLE and a
    ``google.rpc.ErrorInfo`` (reason NOT_LEADER, metadata ``leader_address``) instead of
    answering with a Redirect message; both mean the same to the worker.
    """
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # malformed details must not break reconnecting
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.reason == "NOT_LEADER":
                if info.domain not in ("", _ERROR_DOMAIN):
                    continue
                return str(info.metadata.get("leader_address", ""))
    return None


class Session:
    """One stream to one coordinator address; :meth:`run` returns when it ends."""

    def __init__(
        self,
        target: str,
        *,
        info: HelloInfo,
        runtime: Runtime,
        draining: bool,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        on_welcome: Callable[[Session], None] | None = None,
    ) -> None:
        self.target = target
        self._on_welcome_callback = on_welcome
        self._info = info
        self._runtime = runtime
        self._draining = draining
        self._credentials = credentials
        self._metadata = tuple(metadata)
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
        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self._last_heard = 0.0
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
            while batch := self._take_batch():
                await self._outgoing.put(pb.ConnectRequest(results=pb.Results(results=batch)))
            await self._outgoing.put(None)
        await self._finished.wait()

    # -- RuntimeListener ---------------------------------------------------------------

    def results_ready(self) -> None:
        """Wake the results loop (called by the runtime)."""
        self._results_wanted.set()
        if self._runtime.outbox.unsent_count() >= RESULT_BATCH_MAX:
            self._batch_full.set()

    def slots_changed(self) -> None:
        """Wake the credit loop (called by the runtime)."""
        self._credit_wanted.set()

    # -- the session -------------------------------------------------------------------

    async def run(self) -> SessionEnd:
        """Open the stream, converse until it ends, and clean up everything it started."""
        # A fresh channel per session: a Redirect points somewhere else, and reconnecting
        # (with backoff, across addresses) is the Connector's job, not gRPC's.
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        tasks: list[asyncio.Task[SessionEnd | None]] = []
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse] | None = None
        try:
            stub = pb_grpc.WorkerServiceStub(channel)
            call = stub.Connect(metadata=self._metadata or None)
            end = await self._converse(call, tasks)
        except grpc.aio.AioRpcError as exc:
            leader = not_leader_address(exc)
            if leader is not None:
                end = SessionEnd(welcomed=self._welcomed, redirect=leader)
            else:
                end = SessionEnd(
                    welcomed=self._welcomed,
                    error=f"{exc.code().name}: {exc.details() or 'no details'}",
                    rejected=exc.code() not in _TRANSIENT_CODES,
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
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id=self._info.worker_id,
            hostname=self._info.hostname,
            pid=self._info.pid,
            queues=self._info.queues,
            task_types=self._info.task_types,
            credits=credits,
            in_flight=in_flight,
        )
        self._outstanding = credits
        await self._outgoing.put(pb.ConnectRequest(hello=hello))

        async with asyncio.timeout(WELCOME_TIMEOUT):
            first = await call.read()
        if first is grpc.aio.EOF:
            raise _SessionError("the coordinator closed the stream before Welcome")
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
        interval = welcome.heartbeat_interval.ToTimedelta().total_seconds()
        if interval > 0:
            self._heartbeat_interval = interval
        self._last_heard = asyncio.get_running_loop().time()
        logger.info(
            "connected to coordinator %s (session %s, epoch %d, heartbeat %gs, %d resumed, "
            "%d lost)",
            self.target,
            welcome.session_id,
            welcome.epoch,
            self._heartbeat_interval,
            resumed - len(welcome.lost),
            len(welcome.lost),
        )
        self._runtime.abandon(welcome.lost)

    # -- the loops ---------------------------------------------------------------------

    def _liveness_timeout(self) -> float:
        # A HeartbeatAck answers every heartbeat: three missed in a row means the
        # coordinator (or the path to it) is gone even if TCP has not noticed.
        return 3 * self._heartbeat_interval + 1.0

    async def _send(self, message: pb.ConnectRequest) -> None:
        try:
            async with asyncio.timeout(self._liveness_timeout()):
                await self._outgoing.put(message)
        except TimeoutError:
            raise _SessionError("the coordinator stopped reading the stream") from None

    async def _write_loop(
        self, call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]
    ) -> None:
        while True:
            message = await self._outgoing.get()
            if self._write_closed:
                continue  # after the half-close; unsent results stay in the outbox
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
                for assignment in assignments:
                    runtime.accept(assignment)
            elif kind == "result_acks":
                for ack in message.result_acks.acks:
                    runtime.ack(ack)
            elif kind == "cancel_tasks":
                runtime.cancel(message.cancel_tasks.leases)
            elif kind == "heartbeat_ack":
                runtime.abandon(message.heartbeat_ack.lost)
            elif kind == "redirect":
                return SessionEnd(welcomed=True, redirect=message.redirect.leader_address)
            elif kind == "welcome":
                logger.warning("ignoring a second Welcome on session %s", self.session_id)
            else:
                # A newer coordinator may send messages this SDK does not know.
                logger.debug("ignoring unknown coordinator message %r", kind)

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            silent = loop.time() - self._last_heard
            if silent > self._liveness_timeout():
                raise _SessionError(f"no message from the coordinator for {silent:.1f}s")
            leases = self._runtime.held_leases()
            await self._send(pb.ConnectRequest(heartbeat=pb.Heartbeat(leases=leases)))

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
            grant = self._runtime.free_slots() - self._outstanding
            if grant > 0:
                self._outstanding += grant
                await self._send(pb.ConnectRequest(credit=pb.Credit(credits=grant)))

    async def _results_loop(self) -> None:
        while True:
            await self._results_wanted.wait()
            if self._runtime.outbox.unsent_count() < RESULT_BATCH_MAX:
                # Give results finishing right after this one a moment to share the message.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESULT_BATCH_WINDOW):
                        await self._batch_full.wait()
            self._results_wanted.clear()
            self._batch_full.clear()
            while batch := self._take_batch():
                await self._send(pb.ConnectRequest(results=pb.Results(results=batch)))

    def _take_batch(self) -> list[pb.TaskResult]:
        batch: list[pb.TaskResult] = []
        size = 0
        while len(batch) < RESULT_BATCH_MAX:
            peek = self._runtime.outbox.peek_unsent()
            if peek is None:
                break
            if batch and size + peek.ByteSize() > RESULT_BATCH_BYTES:
                break
            size += peek.ByteSize()
            batch.extend(self._runtime.outbox.take_unsent(1))
        return batch
