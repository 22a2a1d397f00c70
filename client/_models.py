"""The client's value types and their conversions to and from the wire protos.

Every proto <-> Python conversion lives in this module, so the rest of the client (and its
users) deal only in frozen dataclasses, enums, ``datetime`` and ``timedelta``.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.transport._encryption import DecryptionError, envelope_key_id, is_sealed
from conveyor.transport._records import decoder_on_read, frozen_filler
from conveyor.v1 import admin_service_pb2, schedule_pb2, task_pb2, task_service_pb2

__all__ = [
    "AttemptOutcome",
    "BulkResult",
    "CatchUpPolicy",
    "CircuitBreaker",
    "DeadTaskGroup",
    "OverlapPolicy",
    "Page",
    "QueueStats",
    "RateLimit",
    "RetryPolicy",
    "Schedule",
    "ScheduleFiring",
    "Task",
    "TaskAttempt",
    "TaskSpec",
    "TaskState",
]

T = TypeVar("T")

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"


class TaskState(enum.StrEnum):
    """Where a task is in its lifecycle (mirrors ``conveyor.v1.TaskState``).

    ::

        SCHEDULED -> PENDING -> RUNNING -> SUCCEEDED
                                RUNNING -> SCHEDULED (retry backoff) | DEAD | PENDING (lease lost)
        PENDING | SCHEDULED | RUNNING | BLOCKED -> CANCELLED;  DEAD -> PENDING (retry())
        BLOCKED -> PENDING (its dependencies finished) | CANCELLED (one did not succeed)
    """

    #: A state this client does not know (sent by a newer coordinator), or unset.
    UNSPECIFIED = "UNSPECIFIED"
    #: Ready to run; waiting for a worker.
    PENDING = "PENDING"
    #: Waiting for its run_at: a delayed task, or a retry in backoff.
    SCHEDULED = "SCHEDULED"
    #: Leased to one worker.
    RUNNING = "RUNNING"
    #: Finished successfully; terminal.
    SUCCEEDED = "SUCCEEDED"
    #: Failed for good (the dead-letter queue); terminal until redriven with retry().
    DEAD = "DEAD"
    #: Cancelled by a client (or by a dependency that did not succeed); terminal.
    CANCELLED = "CANCELLED"
    #: Submitted with ``after``: waits for those tasks to finish (``Task.waiting_for``).
    BLOCKED = "BLOCKED"

    @property
    def is_terminal(self) -> bool:
        """Whether the task has finished: SUCCEEDED, DEAD or CANCELLED."""
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})


class AttemptOutcome(enum.StrEnum):
    """How one attempt of a task ended (mirrors ``conveyor.v1.AttemptOutcome``)."""

    #: An outcome this client does not know, or unset.
    UNSPECIFIED = "UNSPECIFIED"
    #: The attempt is still running.
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    #: The handler raised an error.
    FAILED = "FAILED"
    #: The handler ran past the task's timeout.
    TIMED_OUT = "TIMED_OUT"
    #: The worker died or went silent and its lease expired.
    LEASE_EXPIRED = "LEASE_EXPIRED"
    #: The task was cancelled while this attempt ran.
    CANCELLED = "CANCELLED"
    #: Leased but never started on a worker (the stream broke before it arrived, the
    #: worker was replaced), or the worker lacked the key its payload is encrypted with;
    #: it does not count against ``max_attempts``.
    NOT_STARTED = "NOT_STARTED"
    #: Stopped by the worker's shutdown (its drain's grace period ran out); the task was
    #: ready again at once, and the attempt does not count against ``max_attempts``.
    INTERRUPTED = "INTERRUPTED"


# Enum tables built from the proto names, so a state added to only one side shows up as
# UNSPECIFIED instead of crashing the client.
_PROTO_STATES = set(task_pb2.TaskState.keys())
_PROTO_OUTCOMES = set(task_pb2.AttemptOutcome.keys())
_STATE_FROM_PROTO: dict[int, TaskState] = {
    task_pb2.TaskState.Value(f"TASK_STATE_{s.name}"): s
    for s in TaskState
    if f"TASK_STATE_{s.name}" in _PROTO_STATES
}
_STATE_TO_PROTO: dict[TaskState, int] = {s: n for n, s in _STATE_FROM_PROTO.items()}
_OUTCOME_FROM_PROTO: dict[int, AttemptOutcome] = {
    task_pb2.AttemptOutcome.Value(f"ATTEMPT_OUTCOME_{o.name}"): o
    for o in AttemptOutcome
    if f"ATTEMPT_OUTCOME_{o.name}" in _PROTO_OUTCOMES
}


def state_from_proto(value: int) -> TaskState:
    """Converts a ``conveyor.v1.TaskState`` number; unknown numbers become UNSPECIFIED."""
    return _STATE_FROM_PROTO.get(value, TaskState.UNSPECIFIED)


def state_to_proto(state: TaskState | str | None) -> int:
    """Converts a state filter (enum or name such as ``"dead"``) to its proto number."""
    if state is None:
        return task_pb2.TASK_STATE_UNSPECIFIED
    parsed = parse_state_name(str(state))
    if parsed is None:
        valid = ", ".join(s.name for s in TaskState if s is not TaskState.UNSPECIFIED)
        raise ValueError(f"unknown task state {state!r}: use one of {valid}")
    return _STATE_TO_PROTO[parsed]


def parse_state_name(name: str) -> TaskState | None:
    """Parses ``"DEAD"``, ``"dead"`` or ``"TASK_STATE_DEAD"``; ``None`` when unknown."""
    key = name.strip().upper().removeprefix("TASK_STATE_")
    try:
        return TaskState[key]
    except KeyError:
        return None


def _to_timedelta(value: timedelta | float | None, name: str) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    raise TypeError(f"{name} must be a timedelta or a number of seconds, not {value!r}")


def _duration(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp_value(value: timestamp_pb2.Timestamp) -> datetime:
    return _datetime(value.seconds, value.nanos)


def _datetime_or_none(msg: Any, name: str) -> datetime | None:
    # Unset message fields read as the epoch; HasField tells "unset" from 1970.
    if not msg.HasField(name):
        return None
    value = getattr(msg, name)
    return _datetime(value.seconds, value.nanos)


@functools.lru_cache(maxsize=1024)
def _datetime(seconds: int, nanos: int) -> datetime:
    """A Timestamp's value; cached, since the tasks of one batch submit share their
    create, update and run times (and a datetime is immutable). Arithmetic instead of
    Timestamp.ToDatetime: several times faster."""
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


@functools.lru_cache(maxsize=256)
def _timedelta(seconds: int, nanos: int) -> timedelta:
    """A Duration's value; cached, since tasks share a handful of timeouts."""
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


@functools.lru_cache(maxsize=256)
def _retry_policy(wire: bytes) -> RetryPolicy:
    """RetryPolicy.from_proto keyed by the message's bytes: tasks share a few policies."""
    return RetryPolicy.from_proto(task_pb2.RetryPolicy.FromString(wire))


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long a task waits between attempts.

    The wait before attempt *n+1* is ``initial_backoff * multiplier**(n-1)``, capped at
    ``max_backoff``, with up to ``jitter`` (a fraction) of it randomised. The defaults are
    the coordinator's own.
    """

    #: Wait before the second attempt.
    initial_backoff: timedelta = timedelta(seconds=1)
    #: Upper bound on any wait.
    max_backoff: timedelta = timedelta(minutes=5)
    #: Growth factor per attempt; at least 1.
    multiplier: float = 2.0
    #: Fraction of each wait that is randomised, 0 to 1.
    jitter: float = 0.2

    def __post_init__(self) -> None:
        # Caught here, where the mistake is made, rather than as a server error later.
        if self.initial_backoff <= timedelta(0):
            raise ValueError(f"initial_backoff must be positive, got {self.initial_backoff}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(
                f"max_backoff ({self.max_backoff}) must be at least "
                f"initial_backoff ({self.initial_backoff})"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def to_proto(self) -> task_pb2.RetryPolicy:
        """Converts to the wire message ``conveyor.v1.RetryPolicy``."""
        return task_pb2.RetryPolicy(
            initial_backoff=_duration(self.initial_backoff),
            max_backoff=_duration(self.max_backoff),
            multiplier=self.multiplier,
            jitter=self.jitter,
        )

    @classmethod
    def from_proto(cls, msg: task_pb2.RetryPolicy) -> RetryPolicy:
        """Converts from the wire message; unset fields take the defaults."""
        default = cls()
        return cls(
            initial_backoff=(
                msg.initial_backoff.ToTimedelta()
                if msg.HasField("initial_backoff")
                else default.initial_backoff
            ),
            max_backoff=(
                msg.max_backoff.ToTimedelta()
                if msg.HasField("max_backoff")
                else default.max_backoff
            ),
            multiplier=msg.multiplier or default.multiplier,
            jitter=msg.jitter,
        )


class _DecodedOnRead:
    """Task's base: the slot that holds the wire message of a Task decoded when first read.

    ``submit_many()`` answers with a Task per task submitted, and decoding each (27
    fields, four times) was more than half the client's CPU per task in ``conveyor
    bench`` (issue 19), though a caller that submits in bulk rarely reads them.
    :meth:`Task._from_wire` makes a Task whose fields are all unset and keeps the
    message; the first read of any field (a slot left unset makes Python call
    ``__getattr__``) decodes all of them at once, as :meth:`Task.from_proto` would have,
    and lets the message go. From then on it is the same object ``from_proto`` makes:
    equal, hashable, picklable, and every field read as plain attribute access.
    """

    __slots__ = ("_wire",)

    if not TYPE_CHECKING:  # mypy would take any attribute of a Task as valid

        def __getattr__(self, name: str) -> Any:
            return _read_task_field(self, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Task(_DecodedOnRead):
    """One task and its current state, as last read from the coordinator."""

    #: Time-ordered id (UUIDv7 text).
    id: str
    state: TaskState
    queue: str
    #: The task type: the name a worker registered a handler under.
    type: str
    #: The payload as sent; see ``content_type``.
    payload: bytes = b""
    #: MIME type of the payload; ``application/json`` unless submitted raw.
    content_type: str = JSON_CONTENT_TYPE
    #: Attempts started so far over the task's whole life (1 while the first runs),
    #: including those that do not count; see ``attempts_counted``.
    attempt: int = 0
    max_attempts: int = 0
    #: Attempts that do not count against ``max_attempts``: those before the last redrive
    #: (``retry()`` gives a fresh budget), those that never started on a worker and those
    #: interrupted by a worker's shutdown.
    uncounted_attempts: int = 0
    #: Higher runs first within a queue.
    priority: int = 0
    #: The handler's return value once SUCCEEDED (JSON from the Python worker); see json().
    result: bytes = b""
    #: The error of the last failed attempt, if any.
    last_error: str | None = None
    idempotency_key: str | None = None
    #: When the task may run next (UTC).
    run_at: datetime | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None
    #: When the task reached a terminal state.
    finish_time: datetime | None = None
    #: The worker holding the lease while RUNNING.
    worker_id: str | None = None
    # Left out of the hash (a dict is unhashable) so tasks can still go in sets.
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    tenant: str = ""
    #: Execution timeout of one attempt.
    timeout: timedelta | None = None
    retry_policy: RetryPolicy | None = None
    #: W3C trace context of the submitter.
    traceparent: str | None = None
    #: True when the read found the task waiting (PENDING or SCHEDULED) with no worker
    #: connected that takes its type from its queue, or none of them holding the key its
    #: payload is encrypted with: nothing runs it until one connects.
    unserved: bool = False
    #: When unserved for want of a key: the key id no connected worker holds.
    unserved_encryption_key: str = ""
    #: While BLOCKED (as read by ``get()``): the ids of the dependencies it still waits for.
    waiting_for: tuple[str, ...] = ()
    #: The task's version: ``update()`` with it changes the task only if nothing else
    #: changed it since this read.
    etag: str = ""

    @property
    def is_terminal(self) -> bool:
        """Whether the task has finished (SUCCEEDED, DEAD or CANCELLED)."""
        return self.state.is_terminal

    @property
    def attempts_counted(self) -> int:
        """Attempts that count against ``max_attempts``: the budget used so far."""
        return max(0, self.attempt - self.uncounted_attempts)

    @property
    def attempt_summary(self) -> str:
        """The attempts as a person reads them: ``"attempt 3 of 3 (6 in all)"``.

        The first number counts against ``max_attempts``; "in all" appears when some
        attempts did not count (a redrive, an attempt that never started or was
        interrupted by a worker's shutdown).
        """
        text = f"attempt {self.attempts_counted} of {self.max_attempts}"
        if self.uncounted_attempts > 0:
            text += f" ({self.attempt} in all)"
        return text

    def unserved_hint(self) -> str:
        """What to do about an unserved task, in one sentence."""
        if self.unserved_encryption_key:
            return (
                f"no connected worker that serves type {self.type!r} on queue "
                f"{self.queue!r} holds encryption key {self.unserved_encryption_key!r}, "
                "which its payload is sealed with; add that key to the workers' key file "
                "(they reread it) or start one that holds it"
            )
        return (
            f"no connected worker serves type {self.type!r} on queue {self.queue!r}; start "
            f"one with a handler for it (for example `conveyor worker MODULE --queues "
            f"{self.queue}`)"
        )

    def json(self) -> Any:
        """Decodes the result as JSON; ``None`` when there is no result (yet).

        Raises:
            DecryptionError: The result is still encrypted (the client that read it had
                no codec holding its key).
        """
        if not self.result:
            return None
        if is_sealed(self.result):
            raise DecryptionError(
                f"the result of task {self.id} is encrypted with key "
                f"{envelope_key_id(self.result)!r}; read it with a client whose codec holds "
                "that key (codec=EncryptionCodec.from_key_file(...))"
            )
        return json.loads(self.result)

    @classmethod
    def from_proto(cls, msg: task_pb2.Task) -> Task:
        """Converts from the wire message ``conveyor.v1.Task``."""
        task = _new_task(Task)
        _decode_task(task, msg)
        return task

    @classmethod
    def _from_wire(cls, msg: task_pb2.Task) -> Task:
        """As :meth:`from_proto`, decoded when a field is first read (see
        ``_DecodedOnRead``). ``msg`` must not change afterwards: it is read then."""
        task = _new_task(Task)
        _set_wire(task, msg)
        return task


def _decode_task(task: Task, msg: task_pb2.Task) -> None:
    """Sets every field of ``task`` from ``msg``: the one conversion of a Task."""
    labels = msg.labels
    has = msg.HasField
    _fill_task(
        task,
        id=msg.id,
        state=_STATE_FROM_PROTO.get(msg.state, TaskState.UNSPECIFIED),
        queue=msg.queue,
        type=msg.type,
        payload=msg.payload,
        content_type=msg.content_type or JSON_CONTENT_TYPE,
        attempt=msg.attempt,
        max_attempts=msg.max_attempts,
        uncounted_attempts=msg.uncounted_attempts,
        priority=msg.priority,
        result=msg.result,
        last_error=msg.last_error or None,
        idempotency_key=msg.idempotency_key or None,
        run_at=_timestamp_value(msg.run_at) if has("run_at") else None,
        create_time=_timestamp_value(msg.create_time) if has("create_time") else None,
        update_time=_timestamp_value(msg.update_time) if has("update_time") else None,
        finish_time=_timestamp_value(msg.finish_time) if has("finish_time") else None,
        worker_id=msg.worker_id or None,
        labels=dict(labels) if labels else {},
        tenant=msg.tenant,
        timeout=(_timedelta(msg.timeout.seconds, msg.timeout.nanos) if has("timeout") else None),
        retry_policy=(
            _retry_policy(msg.retry_policy.SerializeToString(deterministic=True))
            if has("retry_policy")
            else None
        ),
        traceparent=msg.traceparent or None,
        unserved=False,
        unserved_encryption_key="",
        waiting_for=(),
        etag=msg.etag,
    )


# Task's own __init__ (a frozen dataclass of 27 fields) was a third of from_proto, which
# a submit_many() ran per task (issue 19): its slots are set directly instead.
_fill_task = frozen_filler(Task)
_new_task = object.__new__
_TASK_FIELD_NAMES = frozenset(f.name for f in fields(Task))
_set_wire = _DecodedOnRead._wire.__set__  # type: ignore[attr-defined]
_read_task_field = decoder_on_read(
    _DecodedOnRead._wire,  # type: ignore[attr-defined]
    _TASK_FIELD_NAMES,
    _decode_task,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAttempt:
    """One attempt of a task."""

    #: 1 for the first attempt.
    attempt: int
    outcome: AttemptOutcome
    worker_id: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    #: The error the attempt ended with, if any.
    error: str | None = None

    @classmethod
    def from_proto(cls, msg: task_pb2.TaskAttempt) -> TaskAttempt:
        """Converts from the wire message ``conveyor.v1.TaskAttempt``."""
        return cls(
            attempt=msg.attempt,
            outcome=_OUTCOME_FROM_PROTO.get(msg.outcome, AttemptOutcome.UNSPECIFIED),
            worker_id=msg.worker_id or None,
            start_time=_datetime_or_none(msg, "start_time"),
            end_time=_datetime_or_none(msg, "end_time"),
            error=msg.error or None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreaker:
    """A task type's circuit breaker that is not closed: the leader dispatches none of the
    type while it is ``"open"``, then a few probes (``"half-open"``)."""

    type: str
    #: ``"open"`` or ``"half-open"``.
    state: str
    #: When it last opened.
    opened_time: datetime | None = None

    @classmethod
    def from_proto(cls, msg: task_pb2.CircuitBreaker) -> CircuitBreaker:
        """Converts from the wire message ``conveyor.v1.CircuitBreaker``."""
        state = task_pb2.CircuitBreakerState.Name(msg.state)
        return cls(
            type=msg.type,
            state=state.removeprefix("CIRCUIT_BREAKER_STATE_").lower().replace("_", "-"),
            opened_time=_datetime_or_none(msg, "opened_time"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """A rate limit at dispatch: tasks of a queue and/or type start at most ``rate`` a
    second (``burst`` at once after a quiet spell), however many workers take them."""

    #: The queue it limits; "" for every queue.
    queue: str = ""
    #: The task type it limits; "" for every type (both "": the whole tenant).
    type: str = ""
    rate: float
    burst: int = 0
    #: Across every tenant together (an admin's), not the caller's tenant alone.
    all_tenants: bool = False
    #: Tokens left, as the leader last wrote them (about once a second).
    tokens: float = 0.0

    @classmethod
    def from_proto(cls, msg: task_pb2.RateLimit) -> RateLimit:
        """Converts from the wire message ``conveyor.v1.RateLimit``."""
        return cls(
            queue=msg.queue,
            type=msg.type,
            rate=msg.rate,
            burst=msg.burst,
            all_tenants=msg.all_tenants,
            tokens=msg.tokens,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """A queue's task counts by state. ``pending``, ``scheduled`` and ``dead`` are exact
    up to the call's cap (``queues(count_limit=...)``, else the server's default of
    10,000); beyond it the count is the cap and its ``*_capped`` flag is set, meaning "at
    least this many". ``running`` is always exact."""

    name: str
    #: Ready to run now.
    pending: int = 0
    #: Waiting for a future run_at.
    scheduled: int = 0
    running: int = 0
    #: In the dead-letter queue.
    dead: int = 0
    #: More are pending than the cap: ``pending`` is a lower bound.
    pending_capped: bool = False
    #: More are scheduled than the cap: ``scheduled`` is a lower bound.
    scheduled_capped: bool = False
    #: More are dead than the cap: ``dead`` is a lower bound.
    dead_capped: bool = False
    #: Workers connected to the leader that take tasks from this queue.
    workers: int = 0
    #: When the oldest PENDING task became ready (its run_at); ``None`` when none is.
    #: Exact unless ``pending_capped``: then the oldest of the first cap + 1 in dispatch
    #: order, and the queue's oldest has waited at least this long.
    oldest_pending_time: datetime | None = None
    #: The rate limits that cover this queue (its own, and by type in every queue).
    rate_limits: tuple[RateLimit, ...] = ()
    #: Paused (``pause_queue``): it accepts submits and dispatches nothing.
    paused: bool = False

    @classmethod
    def from_proto(cls, msg: task_pb2.QueueStats) -> QueueStats:
        """Converts from the wire message ``conveyor.v1.QueueStats``."""
        return cls(
            name=msg.name,
            pending=msg.pending,
            scheduled=msg.scheduled,
            running=msg.running,
            dead=msg.dead,
            pending_capped=msg.pending_capped,
            scheduled_capped=msg.scheduled_capped,
            dead_capped=msg.dead_capped,
            workers=msg.workers,
            oldest_pending_time=_datetime_or_none(msg, "oldest_pending_time"),
            rate_limits=tuple(RateLimit.from_proto(r) for r in msg.rate_limits),
            paused=msg.paused,
        )


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker connected to the leader, as :meth:`AsyncClient.workers` lists it."""

    worker_id: str
    #: The tenant of its key (worker ids are unique only within a tenant).
    tenant: str = ""
    hostname: str = ""
    pid: int = 0
    queues: tuple[str, ...] = ()
    #: The task types it has handlers for; it is assigned no other type.
    task_types: tuple[str, ...] = ()
    #: Free slots it has granted and the coordinator has not used yet.
    credit: int = 0
    #: Tasks leased to it that it has not reported a result for yet.
    in_flight: int = 0
    draining: bool = False
    #: Why it is assigned nothing for now (its loop lags, its attempts fail where its
    #: peers' succeed); empty while it is healthy.
    unhealthy: str = ""
    connect_time: datetime | None = None
    #: The ids of the encryption keys it holds; ``None`` when it did not say (it is then
    #: assigned every key's tasks).
    encryption_keys: tuple[str, ...] | None = None

    @classmethod
    def from_proto(cls, msg: admin_service_pb2.WorkerInfo) -> WorkerInfo:
        """Converts from the wire message ``conveyor.v1.WorkerInfo``."""
        return cls(
            worker_id=msg.worker_id,
            tenant=msg.tenant,
            hostname=msg.hostname,
            pid=msg.pid,
            queues=tuple(msg.queues),
            task_types=tuple(msg.task_types),
            credit=msg.credit,
            in_flight=msg.in_flight,
            draining=msg.draining,
            unhealthy=msg.unhealthy,
            connect_time=_datetime_or_none(msg, "connect_time"),
            encryption_keys=tuple(msg.encryption_keys.key_ids)
            if msg.HasField("encryption_keys")
            else None,
        )


@dataclass(frozen=True, slots=True)
class DeadTaskGroup:
    """Dead tasks of one type that failed with one error fingerprint."""

    type: str
    #: The first line of their last error ("ValueError: bad address").
    fingerprint: str
    count: int
    #: The earliest and latest time one of them finished.
    first_seen: datetime | None
    last_seen: datetime | None
    queues: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: task_service_pb2.DeadTaskGroup) -> DeadTaskGroup:
        """Converts from the wire message ``conveyor.v1.DeadTaskGroup``."""
        return cls(
            type=msg.type,
            fingerprint=msg.fingerprint,
            count=msg.count,
            first_seen=_datetime_or_none(msg, "first_seen"),
            last_seen=_datetime_or_none(msg, "last_seen"),
            queues=list(msg.queues),
        )


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk redrive or delete did."""

    #: Tasks redriven (``retry_tasks``) or deleted (``delete_tasks``).
    count: int
    #: Of the ids given: those left alone (not dead or cancelled; not finished).
    skipped_ids: list[str] = field(default_factory=list)
    #: Of the ids given: those that name no task.
    not_found_ids: list[str] = field(default_factory=list)
    #: The filter matches more than ``max_tasks``: call again.
    more: bool = False


def dead_filter(
    *,
    queue: str | None = None,
    type: str | None = None,
    fingerprint: str | None = None,
    finished_after: datetime | None = None,
    finished_before: datetime | None = None,
    states: Iterable[TaskState | str] | None = None,
) -> task_service_pb2.DeadTaskFilter:
    """The wire ``DeadTaskFilter`` of a dead-letter call's keyword arguments."""
    flt = task_service_pb2.DeadTaskFilter(
        queue=queue or "",
        type=type or "",
        fingerprint=fingerprint or "",
        states=[state_to_proto(s) for s in states or ()],  # type: ignore[misc]
    )
    if finished_after is not None:
        flt.finished_after.CopyFrom(_timestamp(finished_after))
    if finished_before is not None:
        flt.finished_before.CopyFrom(_timestamp(finished_before))
    return flt


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list call; iterate it for its items."""

    items: list[T]
    #: Pass as ``page_token`` to get the next page; ``None`` on the last page.
    next_page_token: str | None = None

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class TaskOptions(TypedDict, total=False):
    """How a task runs, beside its type and payload: the keyword arguments ``submit()``,
    ``create_schedule()`` and ``update_schedule()`` share, declared once (the fields of
    :class:`TaskTemplate` but those two)."""

    #: The queue to put it on (``"default"``).
    queue: str
    #: Higher runs first within a queue (-1000 to 1000; 0).
    priority: int
    #: Attempts before the task is DEAD; ``None`` for the coordinator's default (3).
    max_attempts: int | None
    #: Execution timeout of one attempt (a timedelta or seconds); ``None`` for the default
    #: (5 min). Not a deadline on the call.
    timeout: timedelta | float | None
    #: Backoff between attempts; ``None`` for the default.
    retry_policy: RetryPolicy | None
    #: Free-form string labels.
    labels: Mapping[str, str] | None
    #: Send a bytes ``payload`` as-is instead of JSON-encoding it.
    raw: bool
    #: Overrides the payload's MIME type (JSON, or octet-stream for raw bytes).
    content_type: str | None


_TEMPLATE_UPDATES = frozenset({"type", "payload", *TaskOptions.__annotations__})


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskTemplate:
    """The task itself, without when or how often: what ``submit()`` sends and what a
    schedule submits at every tick (``create_schedule()``, ``update_schedule()``).

    One value carries these parameters through every method that takes them, and one
    place turns them into each wire message (:meth:`to_proto`, :meth:`TaskSpec.to_proto`,
    :meth:`changes`).
    """

    #: The task type: the name a worker registered a handler under.
    type: str
    #: JSON-encoded unless it is bytes or ``raw`` is set.
    payload: Any = None
    queue: str = "default"
    #: Higher runs first within a queue; -1000 to 1000.
    priority: int = 0
    #: Attempts before the task is DEAD; ``None`` for the coordinator's default (3).
    max_attempts: int | None = None
    #: Execution timeout of one attempt (timedelta or seconds); ``None`` for the default.
    timeout: timedelta | float | None = None
    retry_policy: RetryPolicy | None = None
    labels: Mapping[str, str] | None = None
    #: Send ``payload`` (bytes) as-is instead of JSON-encoding it.
    raw: bool = False
    #: MIME type of the payload; by default JSON, or octet-stream for raw bytes.
    content_type: str | None = None

    def _fill(self, msg: schedule_pb2.TaskTemplate | task_service_pb2.SubmitTaskRequest) -> None:
        payload, content_type = _encode_payload(self.payload, raw=self.raw)
        msg.queue = self.queue
        msg.type = self.type
        msg.payload = payload
        msg.priority = self.priority
        msg.max_attempts = self.max_attempts or 0
        msg.content_type = self.content_type or content_type
        msg.labels.update(self.labels or {})
        timeout = _to_timedelta(self.timeout, "timeout")
        if timeout is not None:
            msg.timeout.CopyFrom(_duration(timeout))
        if self.retry_policy is not None:
            msg.retry_policy.CopyFrom(self.retry_policy.to_proto())

    def to_template(self) -> schedule_pb2.TaskTemplate:
        """Converts to the wire message ``conveyor.v1.TaskTemplate``."""
        msg = schedule_pb2.TaskTemplate()
        self._fill(msg)
        return msg

    @staticmethod
    def changes(msg: schedule_pb2.TaskTemplate, **values: Any) -> list[str]:
        """Writes into ``msg`` the fields of ``values`` that are given (not ``None``; the
        payload: not :data:`UNSET`) and returns their ``update_mask`` paths. ``raw``
        goes with ``payload``; a new payload brings its content type."""
        unknown = values.keys() - _TEMPLATE_UPDATES
        if unknown:
            raise TypeError(
                f"update_schedule() got an unexpected keyword argument {min(unknown)!r}"
            )
        paths: list[str] = []
        for name in ("type", "queue", "priority", "max_attempts"):
            if values.get(name) is not None:
                setattr(msg, name, values[name])
                paths.append(name)
        if values.get("payload", UNSET) is not UNSET:
            msg.payload, msg.content_type = _encode_payload(
                values["payload"], raw=values.get("raw", False)
            )
            paths += ["payload", "content_type"]
        if values.get("content_type") is not None:
            msg.content_type = values["content_type"]
            if "content_type" not in paths:
                paths.append("content_type")
        if values.get("timeout") is not None:
            timeout = _to_timedelta(values["timeout"], "timeout") or timedelta()
            msg.timeout.CopyFrom(_duration(timeout))
            paths.append("timeout")
        if values.get("retry_policy") is not None:
            msg.retry_policy.CopyFrom(values["retry_policy"].to_proto())
            paths.append("retry_policy")
        if values.get("labels") is not None:
            msg.labels.update(values["labels"])
            paths.append("labels")
        return [f"task_template.{path}" for path in paths]


UNSET: Any = object()
"""An argument not given (where ``None`` is a value, as for a payload)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec(TaskTemplate):
    """Everything needed to submit one task; the arguments of ``submit()`` as a value.

    ``submit_many()`` takes a list of these (or of dicts with the same keys).
    """

    #: A second submit with the same key returns the first task instead of a new one;
    #: also what makes a submit safe for the client to retry after a connection failure.
    idempotency_key: str | None = None
    #: Earliest time to run: an aware datetime, or a delay from now.
    run_at: datetime | timedelta | None = None
    #: W3C trace context to link the task's execution to the caller's trace.
    traceparent: str | None = None
    #: At most ``concurrency_limit`` tasks with this key (a customer id) run at once.
    concurrency_key: str | None = None
    #: With ``concurrency_key``: how many of its tasks may run at once (1 by default).
    concurrency_limit: int | None = None
    #: The latest start: an aware datetime, or a delay from now. A task not started by
    #: then ends DEAD (``DEADLINE_EXCEEDED``) without running.
    deadline: datetime | timedelta | None = None
    #: Tasks (ids or :class:`Task` values) that must all finish first: the task waits
    #: BLOCKED until then.
    after: Sequence[str | Task] = ()
    #: What a dependency that ends DEAD or CANCELLED does: ``"cancel"`` this task too
    #: (and its own dependents that say so), or ``"run"`` it anyway.
    on_dependency_failure: Literal["cancel", "run"] = "cancel"
    #: In ``submit_many()``: a name for this task that later tasks of the same call list
    #: in ``after_refs`` (their ids are not known before). One call of up to 1000 tasks.
    ref: str | None = None
    #: In ``submit_many()``: refs of tasks of the same call this task waits for.
    after_refs: Sequence[str] = ()

    def to_proto(self) -> task_service_pb2.SubmitTaskRequest:
        """Converts to the wire message ``conveyor.v1.SubmitTaskRequest``."""
        msg = task_service_pb2.SubmitTaskRequest(
            idempotency_key=self.idempotency_key or "", traceparent=self.traceparent or ""
        )
        self._fill(msg)
        if self.after or self.after_refs or self.ref:
            msg.after.extend(t if isinstance(t, str) else t.id for t in self.after)
            msg.after_refs.extend(self.after_refs)
            msg.ref = self.ref or ""
            if self.on_dependency_failure not in ("cancel", "run"):
                raise ValueError(
                    f"on_dependency_failure must be 'cancel' or 'run', not "
                    f"{self.on_dependency_failure!r}"
                )
            if self.on_dependency_failure == "run":
                msg.dependency_policy = task_pb2.DEPENDENCY_POLICY_RUN
        run_at = _resolve_run_at(self.run_at)
        if run_at is not None:
            msg.run_at.CopyFrom(_timestamp(run_at))
        if self.concurrency_key:
            msg.concurrency_key = self.concurrency_key
        if self.concurrency_limit:
            msg.concurrency_limit = self.concurrency_limit
        deadline = _resolve_run_at(self.deadline)
        if deadline is not None:
            msg.deadline.CopyFrom(_timestamp(deadline))
        return msg


def _encode_payload(payload: Any, *, raw: bool) -> tuple[bytes, str]:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), BYTES_CONTENT_TYPE
    if raw:
        if payload is None:
            return b"", BYTES_CONTENT_TYPE
        raise TypeError(f"raw=True needs a bytes payload, got {type(payload).__name__}")
    # Compact separators: payloads are stored and shipped per task, so spaces add up.
    # None encodes as "null" so that every JSON payload decodes, even an absent one.
    encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return encoded.encode(), JSON_CONTENT_TYPE


def _resolve_run_at(run_at: datetime | timedelta | None) -> datetime | None:
    if run_at is None or isinstance(run_at, datetime):
        if run_at is not None and run_at.tzinfo is None:
            # A naive datetime is ambiguous (local time? UTC?); guessing would shift
            # delayed tasks by hours on machines outside UTC.
            raise ValueError(
                "run_at must be timezone-aware (for example datetime.now(UTC) + delay), "
                "or a timedelta from now"
            )
        return run_at
    if isinstance(run_at, timedelta):
        # Computed here, on the submitter's clock; fine for delays, skewed clocks aside.
        return datetime.now(UTC) + run_at
    raise TypeError(f"run_at must be a datetime or a timedelta, not {run_at!r}")


def task_spec(value: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    """Accepts a TaskSpec or a dict of ``submit()`` keyword arguments."""
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, Mapping):
        return TaskSpec(**value)
    raise TypeError(f"expected a TaskSpec or a dict of submit() arguments, got {value!r}")


# -- schedules ---------------------------------------------------------------------------


class OverlapPolicy(enum.StrEnum):
    """What a tick does while the schedule's previous firing is unfinished."""

    #: A policy this client does not know (sent by a newer coordinator).
    UNSPECIFIED = "UNSPECIFIED"
    #: Fire every tick regardless.
    ALLOW = "ALLOW"
    #: Skip the tick while the previous firing is unfinished.
    SKIP = "SKIP"
    #: Keep one tick waiting and fire it when the previous firing finishes.
    BUFFER_ONE = "BUFFER_ONE"


class CatchUpPolicy(enum.StrEnum):
    """What happens to ticks missed while no coordinator was firing (downtime, failover)."""

    #: A policy this client does not know (sent by a newer coordinator).
    UNSPECIFIED = "UNSPECIFIED"
    #: Missed ticks are not fired.
    SKIP = "SKIP"
    #: The latest missed tick fires once for all of them.
    FIRE_ONCE = "FIRE_ONCE"
    #: Every missed tick fires, up to ``catch_up_limit`` of the latest ones.
    FIRE_ALL = "FIRE_ALL"


def _enum_from_proto(enum_type: Any, prefix: str, cls: type[enum.StrEnum], value: int) -> Any:
    try:
        return cls[enum_type.Name(value).removeprefix(prefix)]
    except (ValueError, KeyError):
        return cls["UNSPECIFIED"]


def _enum_to_proto(enum_type: Any, prefix: str, cls: type[enum.StrEnum], value: Any) -> int:
    if value is None:
        return 0
    key = str(value).strip().upper().replace("-", "_").removeprefix(prefix)
    try:
        number: int = enum_type.Value(prefix + cls[key].name)
    except (KeyError, ValueError):
        valid = ", ".join(m.name for m in cls if m.name != "UNSPECIFIED")
        raise ValueError(f"unknown {cls.__name__} {value!r}: use one of {valid}") from None
    return number


def overlap_to_proto(value: OverlapPolicy | str | None) -> int:
    """An overlap policy (enum or name such as ``"skip"``) as its proto number."""
    return _enum_to_proto(schedule_pb2.OverlapPolicy, "OVERLAP_POLICY_", OverlapPolicy, value)


def catch_up_to_proto(value: CatchUpPolicy | str | None) -> int:
    """A catch-up policy (enum or name such as ``"fire_all"``) as its proto number."""
    return _enum_to_proto(schedule_pb2.CatchUpPolicy, "CATCH_UP_POLICY_", CatchUpPolicy, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleFiring:
    """One tick of a schedule: the task it submitted, or the limit that refused it."""

    tick_time: datetime
    #: Empty when the tick was refused.
    task_id: str
    #: When the task was written (or the tick refused).
    fire_time: datetime | None = None
    #: The task's state when the schedule was read.
    task_state: TaskState = TaskState.UNSPECIFIED
    #: The tenant limit (``max_backlog``, ``submit_rate``) the tick was over, so it
    #: submitted no task; empty for a tick that fired.
    refused_limit: str = ""

    @classmethod
    def from_proto(cls, msg: schedule_pb2.ScheduleFiring) -> ScheduleFiring:
        """Converts from the wire message ``conveyor.v1.ScheduleFiring``."""
        return cls(
            tick_time=msg.tick_time.ToDatetime(tzinfo=UTC),
            task_id=msg.task_id,
            fire_time=_datetime_or_none(msg, "fire_time"),
            task_state=state_from_proto(msg.task_state),
            refused_limit=msg.refused_limit,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """A cron schedule that submits a task at every tick, as last read from the coordinator.

    The task fields (``type``, ``payload``, ``queue``, ...) are the template's; each firing
    is a task with the idempotency key ``schedule:<id>:<tick time>``.
    """

    name: str
    #: 5 fields, or 6 with seconds first, or an alias such as ``@hourly``.
    cron: str
    #: IANA zone the expression is read in.
    time_zone: str = "UTC"
    #: The task type each firing submits.
    type: str = ""
    payload: bytes = b""
    content_type: str = JSON_CONTENT_TYPE
    queue: str = "default"
    priority: int = 0
    #: ``None`` means the coordinator's default.
    max_attempts: int | None = None
    timeout: timedelta | None = None
    retry_policy: RetryPolicy | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    overlap_policy: OverlapPolicy = OverlapPolicy.ALLOW
    catch_up_policy: CatchUpPolicy = CatchUpPolicy.FIRE_ONCE
    #: Most missed ticks FIRE_ALL fires.
    catch_up_limit: int = 100
    paused: bool = False
    start_time: datetime | None = None
    end_time: datetime | None = None
    #: The next fire times (UTC); empty while paused or when no tick is left.
    next_fire_times: tuple[datetime, ...] = ()
    #: The latest firings, newest first.
    recent_firings: tuple[ScheduleFiring, ...] = ()
    id: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    #: Pass to ``update_schedule(etag=)`` to update only if nobody changed it since.
    etag: str = ""
    #: Why the coordinator set the schedule aside (a stored value it could not use);
    #: empty while it fires. ``update_schedule`` or ``resume_schedule`` restarts it.
    fault: str = ""

    def json(self) -> Any:
        """The template's payload decoded as JSON; ``None`` when empty.

        Raises:
            DecryptionError: The payload is still encrypted (the client that read it had
                no codec holding its key).
        """
        if is_sealed(self.payload):
            raise DecryptionError(
                f"the payload of schedule {self.name} is encrypted with key "
                f"{envelope_key_id(self.payload)!r}; read it with a client whose codec "
                "holds that key (codec=EncryptionCodec.from_key_file(...))"
            )
        return json.loads(self.payload) if self.payload else None

    @classmethod
    def from_proto(cls, msg: schedule_pb2.Schedule) -> Schedule:
        """Converts from the wire message ``conveyor.v1.Schedule``."""
        t = msg.task_template
        return cls(
            name=msg.name,
            cron=msg.cron,
            time_zone=msg.time_zone or "UTC",
            type=t.type,
            payload=t.payload,
            content_type=t.content_type or JSON_CONTENT_TYPE,
            queue=t.queue or "default",
            priority=t.priority,
            max_attempts=t.max_attempts or None,
            timeout=t.timeout.ToTimedelta() if t.HasField("timeout") else None,
            retry_policy=(
                RetryPolicy.from_proto(t.retry_policy) if t.HasField("retry_policy") else None
            ),
            labels=dict(t.labels),
            overlap_policy=_enum_from_proto(
                schedule_pb2.OverlapPolicy, "OVERLAP_POLICY_", OverlapPolicy, msg.overlap_policy
            ),
            catch_up_policy=_enum_from_proto(
                schedule_pb2.CatchUpPolicy, "CATCH_UP_POLICY_", CatchUpPolicy, msg.catch_up_policy
            ),
            catch_up_limit=msg.catch_up_limit,
            paused=msg.paused,
            start_time=_datetime_or_none(msg, "start_time"),
            end_time=_datetime_or_none(msg, "end_time"),
            next_fire_times=tuple(ts.ToDatetime(tzinfo=UTC) for ts in msg.next_fire_times),
            recent_firings=tuple(ScheduleFiring.from_proto(f) for f in msg.recent_firings),
            id=msg.id,
            create_time=_datetime_or_none(msg, "create_time"),
            update_time=_datetime_or_none(msg, "update_time"),
            etag=msg.etag,
            fault=msg.fault,
        )
