"""Runs assignments: slots, timeouts, cancellation and the results pending acknowledgement.

The runtime outlives any one stream. Handlers keep running while the session reconnects,
and results wait (:class:`PendingResults`) until a ResultAck clears them, whichever session that
arrives on. The session only feeds it (assignments, acks, cancels) and drains it (leases
to heartbeat, results to send, credit to grant), through :class:`RuntimeListener`.

Telemetry, per attempt: each handler runs in its own asyncio task (or, one that cannot
suspend, to its end when it starts: ``Runtime._run_eagerly``), whose log fields are
bound at its start (computed only if it logs); with tracing on, inside an ``execute``
span that is a child of the assignment's ``traceparent`` and ends with the attempt's
outcome; with metrics on, the finished run is noted as a tuple and the notes are
recorded in one call per results message (:meth:`Runtime.record_runs`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import math
import time
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol, cast

from conveyor.observability import logs
from conveyor.observability.metrics import WorkerMetrics
from conveyor.observability.tracing import Tracing
from conveyor.transport._encryption import (
    ENCRYPTED_CONTENT_TYPE,
    Binding,
    DecryptionError,
    KeyedCodec,
    KeyUnavailableError,
    PayloadCodec,
    envelope_key_id,
    is_sealed,
)
from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker._codec import (
    TaskFailure,
    call_sync_handler,
    decode_payload,
    describe_exception,
    encode_result,
    sanitize_error,
)
from conveyor.worker._context import CancellationSignal, TaskContext, started_context
from conveyor.worker._effects import HandlerCalls
from conveyor.worker._errors import NonRetryableError
from conveyor.worker._registry import Handler, TaskRegistry
from conveyor.worker._results import AttemptKey, PendingResults, attempt_key

__all__ = ["SHUTDOWN_ERROR", "Runtime", "RuntimeListener"]


logger = logging.getLogger("conveyor.worker")

SUCCEEDED = pb.TASK_OUTCOME_SUCCEEDED
FAILED = pb.TASK_OUTCOME_FAILED
TIMED_OUT = pb.TASK_OUTCOME_TIMED_OUT
CANCELLED = pb.TASK_OUTCOME_CANCELLED
INTERRUPTED = pb.TASK_OUTCOME_INTERRUPTED
KEY_UNAVAILABLE = pb.TASK_OUTCOME_KEY_UNAVAILABLE

SHUTDOWN_ERROR = "worker shut down"
# The content types a result has before encryption (results carry none on the wire).
JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"

#: How metrics and spans name the outcomes; ``lost``: the lease was taken back.
OUTCOME_NAMES = {
    SUCCEEDED: "succeeded",
    FAILED: "failed",
    TIMED_OUT: "timed_out",
    CANCELLED: "cancelled",
    INTERRUPTED: "interrupted",
}
LOST = "lost"
# The outcomes a worker's health is judged by (cancelled and interrupted say nothing).
_SUCCEEDED_NAME = OUTCOME_NAMES[SUCCEEDED]
_JUDGED = frozenset(OUTCOME_NAMES[o] for o in (SUCCEEDED, FAILED, TIMED_OUT))


class RuntimeListener(Protocol):
    """What the runtime tells the connected session."""

    def results_ready(self) -> None:
        """New results are waiting to be sent."""

    def slots_changed(self) -> None:
        """Free slots changed; the session may owe the coordinator credit."""


@dataclasses.dataclass(eq=False, slots=True)
class _Execution:
    """One attempt, from assignment until its handler has returned."""

    key: AttemptKey
    lease: pb.Lease
    assignment: pb.Assignment
    handler: Handler
    timeout: float | None
    #: The payload and content type the handler sees (decoded by the payload codec).
    payload: bytes
    content_type: str
    signal: CancellationSignal = dataclasses.field(default_factory=CancellationSignal)
    context: TaskContext | None = None
    task: asyncio.Task[None] | None = None
    # The thread-side future of a sync handler: a thread cannot be interrupted, so the
    # slot stays taken until this is done, even after the attempt was reported.
    thread_future: concurrent.futures.Future[bytes] | None = None
    # Set once the attempt's outcome is fixed (reported, or abandoned without a report):
    # the first of completion, timeout, cancel, lost lease and shutdown wins.
    decided: bool = False
    # When the attempt times out (the loop's clock), while it waits in _Timeouts.
    timeout_at: float | None = None
    # Telemetry: when the handler started (metrics on), its execute span (tracing on).
    started: float = 0.0
    span: Any = None


def _copy_lease(lease: pb.Lease) -> pb.Lease:
    return pb.Lease(task_id=lease.task_id, attempt=lease.attempt, epoch=lease.epoch)


def _result(
    lease: pb.Lease,
    outcome: pb.TaskOutcome.ValueType,
    *,
    error: str = "",
    retryable: bool = False,
    result: bytes = b"",
) -> pb.TaskResult:
    if not error and not retryable:
        # Most results: only what they carry (each keyword given costs its own set).
        return pb.TaskResult(lease=lease, outcome=outcome, result=result)
    return pb.TaskResult(
        lease=lease,
        outcome=outcome,
        result=result,
        error=sanitize_error(error) if error else "",
        retryable=retryable,
    )


class _Timeouts:
    """The attempts' timeouts, on one timer of the loop.

    A timer per attempt (``loop.call_later``, cancelled when it ends) was a heap push, a
    handle and a cancellation per task, about 3 µs of a no-op task's ~50 µs of worker CPU
    (issue 19). Attempts with the same timeout end in the order they started, so each
    timeout value keeps its attempts in start order (an OrderedDict: an attempt that ends
    leaves it at once, with what it holds), and the one timer waits for the earliest head.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expire: Callable[[_Execution], None]
    ) -> None:
        self._loop = loop
        self._expire = expire
        self._waiting: dict[float, collections.OrderedDict[_Execution, None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, execution: _Execution, timeout: float, start: float) -> None:
        """Times ``execution`` out ``timeout`` seconds after ``start`` (the loop's clock,
        the monotonic one) unless removed first."""
        at = start + timeout
        execution.timeout_at = at
        waiting = self._waiting.get(timeout)
        if waiting is None:
            waiting = self._waiting[timeout] = collections.OrderedDict()
        waiting[execution] = None
        if at < self._timer_at:
            self._arm(at)

    def remove(self, execution: _Execution) -> None:
        """The attempt ended: it no longer times out (the timer may fire for nothing)."""
        if execution.timeout_at is not None:
            execution.timeout_at = None
            assert execution.timeout is not None
            waiting = self._waiting.get(execution.timeout)
            if waiting is not None:
                waiting.pop(execution, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._fire)
        self._timer_at = at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        due: list[_Execution] = []
        earliest = math.inf
        for timeout, waiting in list(self._waiting.items()):
            while waiting:
                execution = next(iter(waiting))
                assert execution.timeout_at is not None
                if execution.timeout_at > now:
                    earliest = min(earliest, execution.timeout_at)
                    break
                waiting.popitem(last=False)
                execution.timeout_at = None
                due.append(execution)
            if not waiting:
                del self._waiting[timeout]
        if earliest < math.inf:
            self._arm(earliest)
        for execution in due:
            self._expire(execution)


class Runtime:
    """Owns every attempt this worker process holds, across sessions."""

    def __init__(
        self,
        registry: TaskRegistry,
        *,
        concurrency: int,
        executor: concurrent.futures.Executor,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
        tracing: Tracing | None = None,
        codec: PayloadCodec | None = None,
        calls: HandlerCalls | None = None,
    ) -> None:
        self._registry = registry
        self._codec = codec
        # Decided once, and without reading ``key_ids``: that may check a key file, and on
        # Python 3.11 ``isinstance(codec, KeyedCodec)`` reads it (3.12 looks it up as
        # this does).
        self._keyed = (
            cast(KeyedCodec, codec)
            if inspect.getattr_static(codec, "key_ids", None) is not None
            else None
        )
        self._metrics = metrics
        self._tracing = tracing if tracing is not None else Tracing.disabled()
        self._untraced = not self._tracing.enabled
        # Finished runs not recorded yet: (queue, type, outcome, seconds); None without
        # metrics, so nothing is noted at all.
        self._runs: list[tuple[str, str, str, float]] | None = [] if metrics else None
        self._concurrency = concurrency
        self._executor = executor
        self._worker_id = worker_id
        # The tenant of the worker's key, from the session's Welcome: a key belongs to one
        # tenant, so every attempt this runtime starts is that tenant's.
        self.tenant = ""
        # The last Welcome's resume token, presented in the next Hello: it proves to the
        # coordinator that this process holds the leases Hello lists. A secret: never logged.
        self._resume_token = b""
        self._calls = calls
        self._loop = asyncio.get_running_loop()
        self._timeouts = _Timeouts(self._loop, self._on_timeout)
        # Attempts whose outcome is not decided yet: their leases are ours to heartbeat.
        self._held: dict[AttemptKey, _Execution] = {}
        # Attempts taking a slot: handlers running, including reported ones whose handler
        # (typically a sync one in its thread) has not returned yet.
        self._occupied: set[_Execution] = set()
        # Assignments beyond the slots (only if the coordinator oversends): started in
        # order as slots free, so the worker never runs more than `concurrency`.
        self._backlog: collections.deque[_Execution] = collections.deque()
        self._pending = PendingResults()
        self._listener: RuntimeListener | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Key ids this worker was given tasks of and lacks, said once each (see accept).
        self._lacking: set[str] = set()
        # What the session calls when the coordinator asks this worker to drain and exit
        # (an operator's DrainWorker): the Worker sets it to its own graceful stop.
        self.on_drain_requested: Callable[[str], None] = lambda reason: None
        # Attempts ended (succeeded, failed, timed out) and failed since the last heartbeat.
        self._finished = 0
        self._failed = 0
        # An attempt is running eagerly (see _run_eagerly), and accept_all runs outside
        # its caller's task.
        self._eager = False
        self._outside_task = False

    @property
    def resume_token(self) -> bytes:
        """The last Welcome's resume token (handlers' ledger records present it too)."""
        return self._resume_token

    @resume_token.setter
    def resume_token(self, token: bytes) -> None:
        self._resume_token = token
        if self._calls is not None:
            self._calls.resume_token = token

    # -- what the session reads ------------------------------------------------------

    def free_slots(self) -> int:
        """How many more assignments the worker can start right now."""
        return self._concurrency - len(self._occupied) - len(self._backlog)

    def held_leases(self) -> list[pb.Lease]:
        """Leases the worker still answers for: for Hello.in_flight and Heartbeat.

        These are the attempts still running (or waiting for a slot) and the attempts whose
        result is not acknowledged yet. The latter matter on reconnect: the coordinator
        takes back at once every lease a worker does not list in Hello, which would make
        a finished task run again and the resent result be refused as stale.
        """
        leases = [_copy_lease(e.lease) for e in self._held.values()]
        leases.extend(
            _copy_lease(lease) for k, lease in self._pending.leases().items() if k not in self._held
        )
        return leases

    async def encryption_keys(self) -> pb.EncryptionKeys | None:
        """The encryption keys this worker opens, for Hello and EncryptionKeys: none
        without a codec, the codec's when it can name them (a key file reread included),
        None (unsaid: given every key's tasks) for a codec that cannot.

        Read in a thread: a codec made from a key file checks the file when asked (a
        stat, and the whole file when it changed), which must not stall the event loop.
        """
        if self._codec is None:
            return pb.EncryptionKeys()
        keyed = self._keyed
        if keyed is None:
            return None
        key_ids = await asyncio.to_thread(lambda: tuple(keyed.key_ids))
        self._lacking.difference_update(key_ids)  # held again: say it again if lost
        return pb.EncryptionKeys(key_ids=key_ids)

    @property
    def pending(self) -> PendingResults:
        """The results waiting to be sent or acknowledged."""
        return self._pending

    def pending_results(self) -> int:
        """Results waiting for an acknowledgement."""
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Wait until no attempt is held (every outcome decided)."""
        await self._idle.wait()

    def running_count(self) -> int:
        """Attempts held (running or waiting for a slot)."""
        return len(self._held)

    def take_outcomes(self) -> tuple[int, int]:
        """Attempts ended (succeeded, failed or timed out) since the last call, and how many
        of those failed: for the heartbeat, which the coordinator judges health by."""
        counts = self._finished, self._failed
        self._finished = self._failed = 0
        return counts

    def busy_slots(self) -> int:
        """Slots taken by handlers (those still running after their attempt was
        reported included)."""
        return len(self._occupied)

    def record_runs(self) -> None:
        """Records the runs finished since the last call in the metrics, in one call.

        Called once per results message sent, and at scrape time.
        """
        runs = self._runs
        if runs and self._metrics is not None:
            self._runs = []
            self._metrics.record_executions(runs)

    # -- session attachment -----------------------------------------------------------

    def attach(self, listener: RuntimeListener) -> None:
        """Make ``listener`` the live session; every unacked result is to be (re)sent."""
        self._listener = listener
        self._pending.resend_all()
        if self._pending.unsent_count():
            listener.results_ready()
        listener.slots_changed()

    def detach(self, listener: RuntimeListener) -> None:
        """The session ended; keep everything for the next one."""
        if self._listener is listener:
            self._listener = None

    # -- what the session feeds ------------------------------------------------------

    def accept_all(self, assignments: Iterable[pb.Assignment]) -> None:
        """Take one Assignments message's assignments (:meth:`accept` each), out of the
        caller's task once for them all rather than once per attempt run eagerly."""
        loop = self._loop
        caller = asyncio.current_task(loop)
        if caller is not None:
            _leave_task(loop, caller)
        self._outside_task = True
        try:
            for assignment in assignments:
                self.accept(assignment)
        finally:
            self._outside_task = False
            if caller is not None:
                _enter_task(loop, caller)

    def accept(self, assignment: pb.Assignment) -> None:
        """Take one assignment: start it, or queue it if no slot is free."""
        # Not copied: the execution keeps the assignment (and so its lease) alive anyway,
        # and a result copies the lease into itself.
        lease = assignment.lease
        key = (lease.task_id, lease.attempt)
        if key in self._held or key in self._pending:
            # A coordinator resending an attempt we already run or finished: the running
            # handler or its pending result answers it; running it twice would duplicate effects.
            logger.warning("ignoring duplicate assignment of task %s attempt %d", *key)
            self._notify_slots()  # the credit it consumed is owed back
            return
        handler = self._registry.get(assignment.type)
        if handler is None:
            known = ", ".join(sorted(self._registry.types())) or "none"
            error = (
                f"no handler registered for task type {assignment.type!r} on worker "
                f"{self._worker_id} (registered: {known})"
            )
            logger.error("task %s: %s", lease.task_id, error)
            self._emit(_result(lease, FAILED, error=error, retryable=False))
            self._notify_slots()
            return
        try:
            payload, content_type = self._open_payload(assignment)
        except KeyUnavailableError as exc:
            # Another worker may hold the key: the task goes back, not counted, and the
            # coordinator gives this worker no more of that key's tasks.
            if exc.key_id not in self._lacking:
                self._lacking.add(exc.key_id)
                logger.error(
                    "%s; this worker gives such tasks back for a worker that holds the key "
                    "and is sent no more of them (said once per key)",
                    exc,
                )
            self._emit(
                pb.TaskResult(
                    lease=lease,
                    outcome=KEY_UNAVAILABLE,
                    error=sanitize_error(str(exc)),
                    key_id=exc.key_id,
                )
            )
            self._notify_slots()
            return
        except TaskFailure as exc:
            # Another attempt would see the same bytes: fail for good, without a slot.
            logger.error("task %s: %s", lease.task_id, exc.message)
            self._emit(_result(lease, FAILED, error=exc.message, retryable=False))
            self._notify_slots()
            return
        timeout: float | None = None
        if assignment.HasField("timeout"):
            # One read of the field: each one makes a message wrapper.
            duration = assignment.timeout
            timeout = duration.seconds + duration.nanos / 1e9
            if timeout <= 0:
                timeout = None
        execution = _Execution(
            key=key,
            lease=lease,
            assignment=assignment,
            handler=handler,
            timeout=timeout,
            payload=payload,
            content_type=content_type,
        )
        self._held[key] = execution
        self._idle.clear()
        if self._backlog or len(self._occupied) >= self._concurrency:
            logger.warning(
                "coordinator assigned task %s beyond the granted credit; it waits for a slot",
                lease.task_id,
            )
            self._backlog.append(execution)
            return
        self._start(execution)

    def ack(self, acks: Iterable[pb.ResultAck]) -> None:
        """A ResultAcks message's acks: accepted or refused, each result is done with."""
        self._pending.ack_all(acks)

    def cancel(self, leases: Iterable[pb.Lease]) -> None:
        """CancelTasks: stop these attempts and report them CANCELLED."""
        for lease in leases:
            key = attempt_key(lease)
            execution = self._held.get(key)
            if execution is None:
                # Already finished; its result answers the cancel (and will be refused).
                self._pending.cancelled(key)
                continue
            logger.info("task %s attempt %d cancelled by the coordinator", *execution.key)
            self._stop(
                execution,
                "cancelled by the coordinator",
                _result(execution.lease, CANCELLED, error="cancelled by the coordinator"),
            )

    def abandon(self, leases: Iterable[pb.Lease]) -> None:
        """Leases the coordinator says are no longer ours: stop, and report nothing."""
        for lease in leases:
            execution = self._held.get(attempt_key(lease))
            if execution is None:
                continue  # finished meanwhile: its result will be refused or accepted
            logger.warning(
                "lease of task %s attempt %d lost; abandoning the attempt", *execution.key
            )
            self._stop(execution, "lease lost", None)

    def stop_all(self, reason: str = SHUTDOWN_ERROR) -> None:
        """Stop every held attempt because the worker shuts down: each is INTERRUPTED.

        The coordinator makes such a task ready again at once, and the attempt does not
        count against its ``max_attempts`` (the handler was stopped, it did not fail).
        """
        for execution in list(self._held.values()):
            self._stop(
                execution,
                reason,
                _result(execution.lease, INTERRUPTED, error=reason, retryable=True),
            )

    async def close(self) -> None:
        """Cancel the handlers still running and wait for them to end.

        Unbounded (a handler may swallow cancellation): the caller bounds it.
        """
        self._listener = None
        tasks = self._running_tasks()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _running_tasks(self) -> list[asyncio.Task[None]]:
        """The handlers' tasks not done yet. Each is held by its execution while the
        execution takes a slot, which it does until the task's last step: no set of
        tasks with a done callback per task (a callback of the loop per attempt)."""
        return [e.task for e in self._occupied if e.task is not None and not e.task.done()]

    def report_leftovers(self) -> None:
        """Log what could not be stopped (handlers ignoring cancellation, busy threads)."""
        tasks = self._running_tasks()
        if tasks:
            logger.warning("%d async handler(s) ignored cancellation", len(tasks))
        busy = sum(1 for e in self._occupied if e.thread_future and not e.thread_future.done())
        if busy:
            # Threads cannot be interrupted: the interpreter waits for them at exit.
            logger.warning(
                "%d sync handler(s) still running in threads; the process exits when they return",
                busy,
            )

    # -- execution ---------------------------------------------------------------------

    def _start(self, execution: _Execution) -> None:
        assignment = execution.assignment
        deadline = None
        # A handler that cannot suspend runs to its end right here, in its first step
        # (not while another attempt does: a slot it frees may start the next one).
        eager = execution.handler.never_suspends and not self._eager
        # One reading for the deadline, the timer and the recorded start: a start read
        # after the timer was set made a timed-out run look shorter than its timeout.
        start = time.monotonic()
        if execution.timeout is not None:
            deadline = start + execution.timeout
            if not eager:  # no timer can fire before an eager run ends
                # The loop's clock is the monotonic clock, the same as `deadline`.
                self._timeouts.add(execution, execution.timeout, start)
        # The task's fields are decoded when the handler first reads them (many never do).
        execution.context = started_context(
            assignment,
            deadline=deadline,
            content_type=execution.content_type,
            worker_id=self._worker_id,
            tenant=self.tenant,
            cancelled=execution.signal,
            calls=self._calls,
        )
        if self._runs is not None:
            execution.started = start
        self._occupied.add(execution)
        # One coroutine per attempt without tracing: _attempt runs the handler in its own
        # frame (a coroutine each for the span, the attempt and the call was two more
        # objects and awaits per task; issue 19).
        coro = self._attempt(execution) if self._untraced else self._traced(execution)
        if eager:
            self._run_eagerly(execution, coro)
            return
        execution.task = self._loop.create_task(
            coro,
            # A constant: formatting the type and id into each name was as costly as the
            # TaskContext (issue 19); the log fields and spans name the attempt.
            name="conveyor-task",
        )

    def _run_eagerly(self, execution: _Execution, coro: Coroutine[Any, Any, None]) -> None:
        """Runs the attempt of a handler that cannot suspend to its end, now, without a
        task of its own.

        A task per attempt (its creation, a turn of the loop to take its one step, and
        asyncio's registry of tasks) was the largest cost of a no-op task left in the
        worker (issue 19); Python 3.12's eager tasks do this, 3.11 has none. What the
        handler sees is a task's: a copy of the context as it was when the attempt
        started, its exceptions mapped by ``_attempt``, and no cancellation, timeout or
        lost lease can reach it while it runs (none could reach a task between two
        awaits either, and it has none). It runs outside any task: ``current_task()`` is
        None in it, not the session's task, which it must not be able to cancel.
        """
        loop = self._loop
        # Out of its caller's task already when called from accept_all.
        caller = None if self._outside_task else asyncio.current_task(loop)
        if caller is not None:
            _leave_task(loop, caller)
        self._eager = True
        try:
            contextvars.copy_context().run(coro.send, None)
        except StopIteration:
            pass
        except Exception:
            # A task would have ended with it and logged it: the attempt's own failure,
            # not its caller's (the session's reader).
            logger.exception("task %s attempt %d: the worker failed", *execution.key)
        else:
            # It suspended after all (a handler's code changed after it was registered):
            # stopped here, it fails retryably instead of hanging with its lease held.
            logger.error(
                "task %s attempt %d: handler %r suspended though it has no await",
                *execution.key,
                execution.handler.func,
            )
            with contextlib.suppress(BaseException):
                coro.throw(asyncio.CancelledError())
        finally:
            self._eager = False
            if caller is not None:
                _enter_task(loop, caller)

    async def _traced(self, execution: _Execution) -> None:
        ctx = execution.context
        assert ctx is not None
        with self._tracing.execution_span(
            ctx.traceparent,
            task_id=ctx.task_id,
            queue=ctx.queue,
            type_=ctx.type,
            attempt=ctx.attempt,
            tenant=ctx.tenant,
        ) as span:
            execution.span = span
            await self._attempt(execution)

    async def _attempt(self, execution: _Execution) -> None:
        ctx = execution.context
        assert ctx is not None
        # This task's own context: the fields stay with it (and its sync handler's thread).
        logs.bind_fields(logs.LazyFields(ctx.log_fields))
        handler = execution.handler
        lease = execution.lease
        result: pb.TaskResult | None
        data = b""
        try:
            try:
                if handler.is_async:
                    value = await handler.func(
                        ctx, decode_payload(handler, execution.payload, execution.content_type)
                    )
                    data = encode_result(handler, value)
                else:
                    # copy_context: the handler sees the caller's contextvars (tracing, log
                    # context), as asyncio.to_thread would give it.
                    future = self._executor.submit(
                        contextvars.copy_context().run,
                        call_sync_handler,
                        handler,
                        ctx,
                        execution.payload,
                    )
                    execution.thread_future = future
                    data = await asyncio.wrap_future(future)
                data = self._seal_result(execution, data)
            except TaskFailure as exc:
                logger.warning("task %s attempt %d failed: %s", *execution.key, exc.message)
                result = _result(lease, FAILED, error=exc.message, retryable=exc.retryable)
            except NonRetryableError as exc:
                logger.warning("task %s attempt %d failed for good: %s", *execution.key, exc)
                result = _result(
                    lease,
                    FAILED,
                    error=describe_exception(exc, with_traceback=False),
                    retryable=False,
                )
            except Exception as exc:
                logger.warning("task %s attempt %d failed", *execution.key, exc_info=exc)
                result = _result(lease, FAILED, error=describe_exception(exc), retryable=True)
            else:
                logger.debug("task %s attempt %d succeeded", *execution.key)
                result = None  # the common case: kept as its parts (add_success)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if execution.decided:
                return  # stopped by the runtime, which already reported the outcome
            if current is not None and current.cancelling():
                raise  # torn down from outside (the loop is shutting down)
            # The handler raised CancelledError on its own (e.g. from a cancelled future
            # it awaited): that is a failure of the attempt, not a cancellation.
            result = _result(
                lease,
                FAILED,
                error="CancelledError raised by the handler",
                retryable=True,
            )
        finally:
            self._release(execution)
        if execution.decided:
            return
        self._decide(execution)
        if result is None:
            self._ran(execution, _SUCCEEDED_NAME, "")
            self._pending.add_success(execution.key, lease.epoch, data)
            if self._listener is not None:
                self._listener.results_ready()
        else:
            self._ran(execution, OUTCOME_NAMES[result.outcome], result.error)
            self._emit(result, execution.key)

    def _open_payload(self, assignment: pb.Assignment) -> tuple[bytes, str]:
        """The payload and content type for the handler, decoded by the codec.

        Raises:
            KeyUnavailableError: The payload is sealed with a key this worker does not
                hold (no codec, or not in its ring): another worker may hold it.
            TaskFailure: Not retryable: the payload cannot be decoded (altered, or
                sealed for another task, schedule or type), or its envelope is malformed.
        """
        data, content_type = assignment.payload, assignment.content_type
        task_id = assignment.lease.task_id
        if self._codec is None:
            if is_sealed(data) or content_type == ENCRYPTED_CONTENT_TYPE:
                key_id = envelope_key_id(data)
                message = (
                    f"the payload of task {task_id} is encrypted (key {key_id!r}) and "
                    f"worker {self._worker_id} has no key ring: give it the application's "
                    "keys (Worker(codec=EncryptionCodec.from_key_file(...)), or "
                    "--encryption-key-file)"
                )
                if key_id is not None:
                    raise KeyUnavailableError(message, key_id)
                raise TaskFailure(message, retryable=False)
            return data, content_type
        try:
            binding = Binding.payload(
                assignment.type, task_id=task_id, idempotency_key=assignment.idempotency_key
            )
            return self._codec.decode(data, content_type, binding)
        except KeyUnavailableError as exc:
            message = f"worker {self._worker_id} cannot decrypt task {task_id}: {exc}"
            if self._keyed is not None:
                raise KeyUnavailableError(message, exc.key_id) from exc
            # A codec that cannot name its keys: the coordinator could not stop sending
            # this worker such tasks, so giving them back would only bring them back.
            raise TaskFailure(message, retryable=False) from exc
        except DecryptionError as exc:
            raise TaskFailure(
                f"worker {self._worker_id} cannot decrypt task {task_id}: {exc}", retryable=False
            ) from exc
        except Exception as exc:  # a codec of the application's own that failed
            raise TaskFailure(
                f"the payload codec failed on task {task_id}: {type(exc).__name__}: {exc}",
                retryable=False,
            ) from exc

    def _seal_result(self, execution: _Execution, data: bytes) -> bytes:
        """The result as it is to travel, encoded by the codec."""
        if self._codec is None:
            return data
        content_type = BYTES_CONTENT_TYPE if execution.handler.raw else JSON_CONTENT_TYPE
        binding = Binding.result(execution.assignment.type, execution.lease.task_id)
        try:
            sealed, _ = self._codec.encode(data, content_type, binding)
        except Exception as exc:
            # The handler ran; running it again would repeat its effects to fail the same way.
            raise TaskFailure(
                f"the payload codec could not encode the result of task "
                f"{execution.lease.task_id}: {type(exc).__name__}: {exc}",
                retryable=False,
            ) from exc
        return sealed

    def _on_timeout(self, execution: _Execution) -> None:
        error = f"attempt timed out after {execution.timeout:g}s"
        logger.warning("task %s attempt %d: %s", *execution.key, error)
        self._stop(
            execution, "timed out", _result(execution.lease, TIMED_OUT, error=error, retryable=True)
        )

    def _stop(self, execution: _Execution, reason: str, result: pb.TaskResult | None) -> None:
        """Fix the outcome now and stop the handler without waiting for it."""
        if execution.decided:
            return
        self._decide(execution)
        execution.signal._set(reason)
        if execution.context is not None:  # started (in a task, or eagerly)
            if result is None:
                self._ran(execution, LOST, reason)
            else:
                self._ran(execution, OUTCOME_NAMES[result.outcome], result.error)
        if result is not None:
            self._emit(result)
        if execution.context is None:
            # Still in the backlog: it never ran, so it only gives its place back.
            self._backlog.remove(execution)
            self._notify_slots()
        elif execution.task is not None:
            # For a sync handler this only stops the wait; the thread sees the signal.
            execution.task.cancel()
        # (An eager run left undecided only by an exception that ends the loop, or a
        # failure of the runtime's own code, has nothing left to stop.)

    def _ran(self, execution: _Execution, outcome: str, error: str) -> None:
        """A handler run ended with ``outcome``: noted for the metrics, marked on its span."""
        if outcome in _JUDGED:
            self._finished += 1
            self._failed += outcome != _SUCCEEDED_NAME
        if self._runs is not None:
            assignment = execution.assignment
            seconds = time.monotonic() - execution.started
            self._runs.append((assignment.queue, assignment.type, outcome, seconds))
        if execution.span is not None:
            Tracing.record_outcome(execution.span, outcome, error)

    def _decide(self, execution: _Execution) -> None:
        execution.decided = True
        self._timeouts.remove(execution)
        self._held.pop(execution.key, None)
        if not self._held:
            self._idle.set()

    def _release(self, execution: _Execution) -> None:
        future = execution.thread_future
        if future is None or future.done():
            self._free_slot(execution)
            return
        logger.warning(
            "sync handler of task %s attempt %d is still running after it was stopped; "
            "its slot stays taken until it returns (poll ctx.is_cancelled())",
            *execution.key,
        )
        loop = self._loop

        def thread_done(_: concurrent.futures.Future[bytes]) -> None:
            # A closed loop raises RuntimeError: nobody needs the slot any more then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._free_slot, execution)

        future.add_done_callback(thread_done)

    def _free_slot(self, execution: _Execution) -> None:
        if execution not in self._occupied:
            return
        self._occupied.discard(execution)
        while self._backlog and len(self._occupied) < self._concurrency:
            self._start(self._backlog.popleft())
        self._notify_slots()

    def _emit(self, result: pb.TaskResult, key: AttemptKey | None = None) -> None:
        self._pending.add(result, key)
        if self._listener is not None:
            self._listener.results_ready()

    def _notify_slots(self) -> None:
        if self._listener is not None:
            self._listener.slots_changed()
