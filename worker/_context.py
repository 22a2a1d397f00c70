"""What a handler knows about the attempt it runs: :class:`TaskContext`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from conveyor.observability.logs import TaskLoggerAdapter, task_logger
from conveyor.transport._records import decoder_on_read
from conveyor.worker import _effects
from conveyor.worker._effects import HandlerCalls, Ledger, fencing_token

if TYPE_CHECKING:
    from conveyor.client._locks import Lock
    from conveyor.v1 import worker_service_pb2 as pb

__all__ = ["CancellationSignal", "TaskContext", "started_context"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Most tasks have no labels: one read-only empty mapping serves them all.
_NO_LABELS: MappingProxyType[str, str] = MappingProxyType({})


@functools.lru_cache(maxsize=256)
def _datetime(seconds: int, nanos: int) -> datetime:
    """A Timestamp's value; cached, since the tasks of one submit share a create time
    (and a datetime is immutable)."""
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


class CancellationSignal:
    """Tells a handler that its attempt was stopped, from async and sync code alike.

    The worker sets it when the attempt times out, when the coordinator cancels the task or
    takes the lease back, and when the worker shuts down. Async handlers are also cancelled
    (they get :class:`asyncio.CancelledError`); sync handlers, which run in a thread and
    cannot be interrupted, should poll :meth:`is_set` or block on :meth:`wait_sync` and
    return early.

    It keeps two events because neither serves both worlds: an :class:`asyncio.Event` can
    be awaited but is not thread-safe, a :class:`threading.Event` is thread-safe but would
    block the event loop if awaited. Only the worker sets it, always on the loop thread.
    """

    __slots__ = ("_async_event", "_is_set", "_reason", "_thread_event")

    # Guards only the lazy creation of a thread event from two threads at once.
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        # Both events are made on first use: most handlers never wait on the signal, and
        # a threading.Event (a Condition and a lock) per task is measurable at 10k tasks/s.
        self._is_set = False
        self._async_event: asyncio.Event | None = None
        self._thread_event: threading.Event | None = None
        self._reason = ""

    def is_set(self) -> bool:
        """Whether the attempt was stopped; safe to call from any thread."""
        return self._is_set

    @property
    def reason(self) -> str:
        """Why the attempt was stopped (empty while it was not)."""
        return self._reason

    async def wait(self) -> None:
        """Wait until the attempt is stopped (from the worker's event loop only)."""
        if self._async_event is None:
            self._async_event = asyncio.Event()
            if self._is_set:
                self._async_event.set()
        await self._async_event.wait()

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the attempt is stopped or ``timeout`` passes.

        For sync handlers only: calling it on the event loop would stall the worker.
        Returns whether the signal is set.
        """
        event = self._thread_event
        if event is None:
            with self._create_lock:
                if self._thread_event is None:
                    self._thread_event = threading.Event()
                event = self._thread_event
            # _set() stores the flag before it looks for the event, and this looks at the
            # flag after publishing the event: one of the two sets it, so no wake-up is lost.
            if self._is_set:
                event.set()
        return event.wait(timeout)

    def _set(self, reason: str) -> None:
        if self._is_set:
            return
        self._reason = reason
        self._is_set = True
        if self._thread_event is not None:
            self._thread_event.set()
        if self._async_event is not None:
            self._async_event.set()


class _DecodedOnRead:
    """TaskContext's base: the slot that holds the assignment of a context whose task
    fields are decoded when first read.

    The worker makes a context per attempt, and reading its dozen fields out of the
    assignment (each read of a protobuf field makes a new object) cost more than the
    rest of starting a no-op attempt (issue 19), though many handlers read none of them.
    :func:`started_context` sets what the worker itself knows (deadline, worker,
    tenant, signal) and keeps the assignment; the first read of a task field (a slot
    left unset makes Python call ``__getattr__``) decodes them all and lets the
    assignment go. From then on it is the context the constructor would have made.
    """

    __slots__ = ("_assignment",)

    if not TYPE_CHECKING:  # mypy would take any attribute of a context as valid

        def __getattr__(self, name: str) -> Any:
            return _read_task_field(self, name)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TaskContext(_DecodedOnRead):
    """The attempt a handler is running, passed as its first argument.

    Attributes:
        task_id: The task's id (a UUIDv7 string).
        type: The task type the handler was registered for.
        queue: The queue the task came from.
        attempt: This attempt's number, starting at 1.
        max_attempts: How many attempts the task gets in total.
        idempotency_key: The key given at submit time ("" when none); with ``task_id``
            and ``attempt`` it lets a handler deduplicate its side effects, since delivery
            is at-least-once.
        deadline: When the worker stops this attempt, as a :func:`time.monotonic` value
            (the event loop's clock), or ``None`` when the attempt has no timeout. Compare
            it with ``time.monotonic()``, or use :meth:`time_remaining`.
        labels: The task's labels (read-only).
        content_type: The payload's content type as submitted.
        traceparent: The submitter's W3C trace context ("" when none).
        create_time: When the task was submitted (UTC), when the coordinator said.
        worker_id: The id this worker process registered with.
        tenant: The tenant the task belongs to (the worker key's tenant; ``"default"``
            against a coordinator without authentication).
        epoch: The coordinator epoch (leader term) that leased this attempt.
        fencing_token: This attempt's fencing token, ``epoch << 32 | attempt``: larger
            for every later attempt of the task, across leader failover too. Pass it to
            what the handler writes, and have the destination refuse a token smaller
            than the largest it accepted (``conveyor.worker.pg_ledger``).
        ledger: The task's idempotency ledger (:class:`~conveyor.worker.Ledger`): record
            an effect after doing it, look it up before; async handlers only.
        cancelled: Set when the attempt is stopped (timeout, cancellation, lost lease,
            shutdown); see :class:`CancellationSignal`.

    :attr:`logger` is a logger whose lines carry the attempt's fields (``task_id``,
    ``attempt``, ``queue``, ``type``, ``worker_id``, ``tenant``, ``epoch``): as keys of the
    JSON line with ``--log-format json``, as ``key=value`` in text. Any logger used while
    the handler runs adds them too, when logging is set up by ``conveyor`` (the CLI or
    :meth:`Worker.run_sync`).
    """

    task_id: str
    type: str
    queue: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    deadline: float | None
    labels: Mapping[str, str]
    content_type: str = ""
    traceparent: str = ""
    create_time: datetime | None = None
    worker_id: str = ""
    tenant: str = ""
    epoch: int = 0
    cancelled: CancellationSignal = dataclasses.field(
        default_factory=CancellationSignal, repr=False, compare=False
    )
    _logger: TaskLoggerAdapter | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _calls: HandlerCalls | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fencing_token(self) -> int:
        """This attempt's fencing token (see the class docstring)."""
        return fencing_token(self.epoch, self.attempt)

    @property
    def ledger(self) -> Ledger:
        """The task's idempotency ledger (see :class:`~conveyor.worker.Ledger`)."""
        return Ledger(self, self._handler_calls())

    def lock(
        self, name: str, ttl: float, *, timeout: float | None = None, renew: bool = True
    ) -> Lock:
        """A named lock of the worker's tenant, with a fencing token:
        ``async with ctx.lock("ledger-export", ttl=30) as lock: ... lock.fencing_token``.
        The same as :meth:`conveyor.client.AsyncClient.lock`: a lock alone does not give
        mutual exclusion, the token check at the resource does."""
        return _effects.lock(self._handler_calls(), name, ttl, timeout, renew)

    def _handler_calls(self) -> HandlerCalls:
        if self._calls is None:
            raise RuntimeError(
                "this TaskContext was not made by a running Worker: the ledger and locks "
                "need the worker's connection to the coordinator"
            )
        return self._calls

    @property
    def logger(self) -> TaskLoggerAdapter:
        """A logger (``conveyor.task``) whose lines carry this attempt's fields."""
        if self._logger is None:
            # A frozen dataclass: the cache is written the way its __init__ writes fields.
            object.__setattr__(self, "_logger", task_logger("conveyor.task", **self.log_fields()))
        assert self._logger is not None
        return self._logger

    def log_fields(self) -> dict[str, object]:
        """The attempt's log fields (see :data:`conveyor.observability.logs.FIELDS`)."""
        return {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "queue": self.queue,
            "type": self.type,
            "worker_id": self.worker_id,
            "tenant": self.tenant,
            "epoch": self.epoch,
        }

    def is_cancelled(self) -> bool:
        """Whether the attempt was stopped; cheap and safe to poll from sync handlers."""
        return self.cancelled.is_set()

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


# The fields the assignment gives, decoded when first read; the others the worker sets
# when the attempt starts. A test checks that the two cover every field.
_FROM_ASSIGNMENT = frozenset(
    (
        "task_id",
        "type",
        "queue",
        "attempt",
        "max_attempts",
        "idempotency_key",
        "labels",
        "traceparent",
        "create_time",
        "epoch",
    )
)
_set_assignment = _DecodedOnRead._assignment.__set__  # type: ignore[attr-defined]
_set: dict[str, Any] = {
    f.name: getattr(TaskContext, f.name).__set__ for f in dataclasses.fields(TaskContext)
}
_set_deadline = _set["deadline"]
_set_content_type = _set["content_type"]
_set_worker_id = _set["worker_id"]
_set_tenant = _set["tenant"]
_set_cancelled = _set["cancelled"]
_set_logger = _set["_logger"]
_set_calls = _set["_calls"]


def started_context(
    assignment: pb.Assignment,
    *,
    deadline: float | None,
    content_type: str,
    worker_id: str,
    tenant: str,
    cancelled: CancellationSignal,
    calls: HandlerCalls | None,
) -> TaskContext:
    """The context of an attempt of ``assignment`` (which must not change afterwards):
    what the worker knows is set now, the task's own fields when first read."""
    ctx: TaskContext = object.__new__(TaskContext)
    _set_assignment(ctx, assignment)
    _set_deadline(ctx, deadline)
    _set_content_type(ctx, content_type)
    _set_worker_id(ctx, worker_id)
    _set_tenant(ctx, tenant)
    _set_cancelled(ctx, cancelled)
    _set_logger(ctx, None)
    _set_calls(ctx, calls)
    return ctx


def _decode(ctx: TaskContext, assignment: pb.Assignment) -> None:
    lease = assignment.lease
    labels = assignment.labels
    created = assignment.create_time if assignment.HasField("create_time") else None
    _set["task_id"](ctx, lease.task_id)
    _set["attempt"](ctx, lease.attempt)
    _set["epoch"](ctx, lease.epoch)
    _set["type"](ctx, assignment.type)
    _set["queue"](ctx, assignment.queue)
    _set["max_attempts"](ctx, assignment.max_attempts)
    _set["idempotency_key"](ctx, assignment.idempotency_key)
    _set["labels"](ctx, MappingProxyType(dict(labels)) if labels else _NO_LABELS)
    _set["traceparent"](ctx, assignment.traceparent)
    _set["create_time"](ctx, None if created is None else _datetime(created.seconds, created.nanos))


_read_task_field = decoder_on_read(
    _DecodedOnRead._assignment,  # type: ignore[attr-defined]
    _FROM_ASSIGNMENT,
    _decode,
)
