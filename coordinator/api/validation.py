"""Checks API requests and worker messages; turns them into normalised values, or field
violations.

Nothing reaches the store unless it passed here, so a bad request writes nothing and
never shares a transaction with others' requests only to fail it. The rule is: refuse
here everything PostgreSQL would refuse, in every field (text with NUL bytes, values out
of a column's range, timestamps out of range), and whatever makes no sense where it
stands (control characters in names, keys and identifiers; a trailing newline in a
queue name).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import graphlib
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.coordinator import bounds
from conveyor.coordinator import config as defaults
from conveyor.coordinator.errors import FieldViolation, InvalidArgument, ProtocolViolation
from conveyor.coordinator.ids import parse_task_id
from conveyor.transport._encryption import SCHEDULE_KEY_PREFIX, is_key_id
from conveyor.v1 import task_pb2, task_service_pb2, worker_service_pb2

PROTOCOL_VERSION = 1
"""The worker protocol version this coordinator speaks (``Hello.protocol_version``)."""
RESUME_TOKEN_BYTES = 32
"""The length of a worker process's resume token (``Welcome.resume_token``)."""

MAX_NAME_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_KEY_IDS = 1000
"""Encryption key ids one worker may name (a key ring keeps its old keys, so it grows)."""
MAX_PRIORITY = 1000
MAX_ATTEMPTS = 1000
# The longest durations (bounds.SECONDS_MAX).
MAX_TIMEOUT = timedelta(seconds=bounds.SECONDS_MAX)
MAX_BACKOFF = timedelta(seconds=bounds.SECONDS_MAX)
MAX_MULTIPLIER = 100.0
MAX_RUN_AT_AHEAD = timedelta(days=366)
MAX_LABELS = 64
MAX_CONCURRENCY_LIMIT = 10_000
"""The most tasks of one concurrency key that may run at once."""
MAX_LABEL_KEY_LENGTH = 63
MAX_LABEL_VALUE_LENGTH = 256
MAX_BATCH = 1000
# Dependencies one task may list in after: a fan-in of this many tasks into one.
MAX_AFTER = 10_000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_CONTENT_TYPE_LENGTH = 128
MAX_TRACEPARENT_LENGTH = 128
MAX_HOSTNAME_LENGTH = 255
MAX_CREDIT = 100_000
MAX_HELLO_QUEUES = 100
MAX_HELLO_TYPES = 1000
# How far a client-made request_id's time may be from the coordinator's clock. Resends
# come within the client's timeout; an id far in the past would also jump its queue (the
# dispatch order falls back to the id), so the window is kept short.
REQUEST_ID_BEHIND = timedelta(hours=1)
REQUEST_ID_AHEAD = timedelta(minutes=5)
_REQUEST_ID_BEHIND_MS = REQUEST_ID_BEHIND // timedelta(milliseconds=1)
_REQUEST_ID_AHEAD_MS = REQUEST_ID_AHEAD // timedelta(milliseconds=1)
# A UUIDv7 in canonical text: version 7, RFC 9562 variant (10xx).
_UUID7 = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
)
_TIME_MIN_SECONDS = int(bounds.TIME_MIN.timestamp())
_TIME_MAX_SECONDS = int(bounds.TIME_MAX.timestamp())
# Queue, type and schedule names travel in metrics labels and CLI output: a safe alphabet,
# matched in full (``$`` would also match before a trailing newline).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-/]*")
NAME_RULE = "must start with a letter or digit and contain only letters, digits and _ . : - /"
# Control characters (C0, DEL, C1): nonsense in an identifier, and NUL is refused by
# PostgreSQL in any text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True)
class NewTask:
    """A validated submit, ready to insert. Treat it as immutable.

    Not ``frozen``: a frozen dataclass sets each of these 24 fields through
    ``object.__setattr__``, 4 µs per task against 0.6 µs, and one is made for every
    submitted task (5 % of the coordinator's samples in the end-to-end phase, see
    docs/performance.md, issue 19). Nothing assigns to one after it is made.
    """

    queue: str
    type: str
    payload: bytes
    content_type: str
    priority: int
    max_attempts: int
    idempotency_key: str | None
    request_hash: bytes
    run_at: datetime | None
    timeout_ms: int
    retry_initial_ms: int
    retry_max_ms: int
    retry_multiplier: float
    retry_jitter: float
    labels: dict[str, str]
    traceparent: str
    task_id: str | None = None
    """The id the client chose (``request_id``, canonical lowercase text), or None for one
    made here. Kept as text: asyncpg encodes text to uuid in C, cheaper than a UUID object
    made per task."""
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    """At most this many tasks with ``concurrency_key`` run at once (None without a key)."""
    deadline: datetime | None = None
    """The latest time the task may start."""
    after: tuple[str, ...] = ()
    """Ids (canonical text, no repeats) of the tasks this one waits for (``after``)."""
    after_refs: tuple[str, ...] = ()
    """Refs of tasks of the same SubmitTasks request this one waits for."""
    ref: str = ""
    """This task's name in its SubmitTasks request, for other tasks' ``after_refs``."""
    run_on_failure: bool = False
    """DEPENDENCY_POLICY_RUN: a dead or cancelled dependency counts as finished."""

    @property
    def has_dependencies(self) -> bool:
        return bool(self.after or self.after_refs)


@functools.lru_cache(maxsize=4096)
def name_problem(value: str) -> str | None:
    """What is wrong with a queue, type or schedule name, or None; cached (names repeat)."""
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if not NAME.fullmatch(value):
        return NAME_RULE
    return None


def check_name(value: str, field: str, out: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            out.append(FieldViolation(field, "must not be empty"))
        return
    problem = name_problem(value)
    if problem is not None:
        out.append(FieldViolation(field, problem))


def check_text(
    value: str,
    field: str,
    out: list[FieldViolation],
    *,
    max_length: int,
    identifier: bool = True,
) -> None:
    """A string field: at most ``max_length`` characters, no NUL; for an ``identifier``
    (a key, a content type, a host name) no control characters at all."""
    if len(value) > max_length:
        out.append(FieldViolation(field, f"must be at most {max_length} characters"))
    elif identifier and _CONTROL.search(value):
        out.append(FieldViolation(field, "must not contain control characters"))
    elif "\x00" in value:
        out.append(FieldViolation(field, "must not contain NUL characters"))


def check_timestamp(value: Any, field: str, out: list[FieldViolation]) -> datetime | None:
    """A Timestamp message as an aware datetime within the one time range
    (``bounds.TIME_MIN`` to ``bounds.TIME_MAX``); None, with a violation, when not."""
    if not 0 <= value.nanos <= 999_999_999:
        out.append(FieldViolation(field, "is not a valid timestamp (nanos out of range)"))
        return None
    problem = None
    if not _TIME_MIN_SECONDS <= value.seconds <= _TIME_MAX_SECONDS:
        problem = f"must be {bounds.TIME_RANGE}"
    else:
        result: datetime = value.ToDatetime(tzinfo=UTC)
        problem = bounds.time_problem(result)  # the last second's nanoseconds
    if problem is not None:
        out.append(FieldViolation(field, problem))
        return None
    return result


def _duration_ms(value: Any, field: str, upper: timedelta, out: list[FieldViolation]) -> int | None:
    """Milliseconds of a Duration message (None when unset); None when bad, with a violation."""
    if value is None:
        return None
    if not -999_999_999 <= value.nanos <= 999_999_999:
        out.append(FieldViolation(field, "is not a valid duration"))
        return None
    nanos = value.seconds * 1_000_000_000 + value.nanos
    if nanos <= 0:
        out.append(FieldViolation(field, "must be positive"))
        return None
    if nanos > upper / timedelta(microseconds=1) * 1000:
        out.append(FieldViolation(field, f"must be at most {upper}"))
        return None
    return max(1, int(nanos) // 1_000_000)


def validate_submit(
    req: task_service_pb2.SubmitTaskRequest,
    *,
    max_payload_bytes: int,
    prefix: str = "",
    now: datetime | None = None,
) -> tuple[NewTask | None, list[FieldViolation]]:
    """Validates one SubmitTaskRequest; field paths get ``prefix`` (``tasks[3].``).

    This runs for every submitted task, so it reads the fields that are set in one call
    (``ListFields``) and checks only those; unset fields take their defaults.
    """
    out: list[FieldViolation] = []
    names = _SUBMIT_FIELD_NAMES
    fields: dict[str, Any] = {names[fd]: value for fd, value in req.ListFields()}
    queue: str = fields.get("queue", "")
    type_: str = fields.get("type", "")
    payload: bytes = fields.get("payload", b"")
    check_name(queue, prefix + "queue", out, required=False)
    check_name(type_, prefix + "type", out, required=True)
    if len(payload) > max_payload_bytes:
        out.append(
            FieldViolation(
                prefix + "payload",
                f"is {len(payload)} bytes, more than the limit of {max_payload_bytes}",
            )
        )
    key: str = fields.get("idempotency_key", "")
    if key:
        check_text(key, prefix + "idempotency_key", out, max_length=MAX_IDEMPOTENCY_KEY_LENGTH)
        if key.startswith(SCHEDULE_KEY_PREFIX):
            # Firings' keys: taken by a client, a tick would not fire, and the task would
            # pass for a firing (a worker opens an encrypted template's payload on it).
            out.append(
                FieldViolation(
                    prefix + "idempotency_key",
                    f"must not start with {SCHEDULE_KEY_PREFIX!r}: that prefix is reserved "
                    "for the tasks schedules fire",
                )
            )
    priority: int = fields.get("priority", 0)
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        out.append(
            FieldViolation(
                prefix + "priority", f"must be between {-MAX_PRIORITY} and {MAX_PRIORITY}"
            )
        )
    max_attempts: int = fields.get("max_attempts", 0)
    if max_attempts < 0 or max_attempts > MAX_ATTEMPTS:
        out.append(
            FieldViolation(
                prefix + "max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0 for the default)"
            )
        )
    content_type: str = fields.get("content_type", "")
    if content_type and _content_type_problem(content_type):
        check_text(content_type, prefix + "content_type", out, max_length=MAX_CONTENT_TYPE_LENGTH)
    run_at: datetime | None = None
    if "run_at" in fields:
        run_at = _check_run_at(fields["run_at"], prefix, now, out)
    timeout_ms = _duration_ms(fields.get("timeout"), prefix + "timeout", MAX_TIMEOUT, out)
    if "retry_policy" in fields:
        initial_ms, max_ms, multiplier, jitter = _check_retry_policy(
            fields["retry_policy"], prefix, out
        )
    else:
        initial_ms, max_ms, multiplier, jitter = _DEFAULT_RETRY
    labels: dict[str, str] = {}
    if "labels" in fields:
        labels = dict(fields["labels"])
        _check_labels(labels, prefix, out)
    traceparent: str = fields.get("traceparent", "")
    if traceparent:
        check_text(traceparent, prefix + "traceparent", out, max_length=MAX_TRACEPARENT_LENGTH)
    task_id: str | None = None
    if "request_id" in fields:
        task_id = _check_request_id(fields["request_id"], prefix + "request_id", now, out)
    flow = _check_flow(fields, run_at, prefix, now, out)
    # Read only when set (ListFields): a submit without dependencies pays nothing here.
    dependencies = _NO_DEPENDENCIES
    if "after" in fields or "after_refs" in fields or "ref" in fields:
        dependencies = _check_dependencies(fields, prefix, out)
    if out:
        return None, out
    task = NewTask(
        queue=queue or defaults.DEFAULT_QUEUE,
        type=type_,
        payload=payload,
        content_type=content_type or defaults.DEFAULT_CONTENT_TYPE,
        priority=priority,
        max_attempts=max_attempts or defaults.DEFAULT_MAX_ATTEMPTS,
        idempotency_key=key or None,
        request_hash=b"",
        run_at=run_at,
        timeout_ms=timeout_ms or _DEFAULT_TIMEOUT_MS,
        retry_initial_ms=initial_ms,
        retry_max_ms=max_ms,
        retry_multiplier=multiplier,
        retry_jitter=jitter,
        labels=labels,
        traceparent=traceparent,
        task_id=task_id,
        concurrency_key=flow[0],
        concurrency_limit=flow[1],
        deadline=flow[2],
        after=dependencies[0],
        after_refs=dependencies[1],
        ref=dependencies[2],
        run_on_failure=dependencies[3],
    )
    # A task with dependencies keeps its fingerprint even without a key: a resend of a
    # DAG by request_id is compared with it, and a stored row does not show its edges.
    if task.has_dependencies:
        return _with_hash(task, force=True), []
    return (_with_hash(task) if key else task), []


# Field descriptor -> name, made once: ``FieldDescriptor.name`` decodes a new string at
# every look (and validate_submit looks at every set field of every submitted task). The
# descriptors are the same objects for as long as this holds them.
_SUBMIT_FIELD_NAMES: dict[Any, str] = {
    fd: fd.name for fd in task_service_pb2.SubmitTaskRequest.DESCRIPTOR.fields
}

_NO_FLOW: tuple[str | None, int | None, datetime | None] = (None, None, None)
_FLOW_FIELDS = frozenset({"concurrency_key", "concurrency_limit", "deadline"})


def _check_flow(
    fields: dict[str, Any],
    run_at: datetime | None,
    prefix: str,
    now: datetime | None,
    out: list[FieldViolation],
) -> tuple[str | None, int | None, datetime | None]:
    """The concurrency key, its limit (1 when not given) and the deadline of a submit."""
    if _FLOW_FIELDS.isdisjoint(fields):
        return _NO_FLOW  # the usual submit: one set test
    key: str = fields.get("concurrency_key", "")
    limit: int = fields.get("concurrency_limit", 0)
    if key or limit:
        _check_concurrency(key, limit, prefix, out)
    deadline: datetime | None = None
    if "deadline" in fields:
        deadline = _check_deadline(fields["deadline"], run_at, prefix, now, out)
    return (key or None), ((limit or 1) if key else None), deadline


def _check_deadline(
    value: Any,
    run_at: datetime | None,
    prefix: str,
    now: datetime | None,
    out: list[FieldViolation],
) -> datetime | None:
    deadline = check_timestamp(value, prefix + "deadline", out)
    if deadline is None:
        return None
    if deadline <= (now or datetime.now(UTC)):
        out.append(FieldViolation(prefix + "deadline", "must be in the future"))
    elif run_at is not None and deadline < run_at:
        out.append(
            FieldViolation(prefix + "deadline", "must not be before run_at (it could never start)")
        )
    return deadline


def _check_concurrency(key: str, limit: int, prefix: str, out: list[FieldViolation]) -> None:
    if not key:
        out.append(FieldViolation(prefix + "concurrency_limit", "needs a concurrency_key to limit"))
    else:
        check_text(key, prefix + "concurrency_key", out, max_length=MAX_NAME_LENGTH)
    if not 0 <= limit <= MAX_CONCURRENCY_LIMIT:
        out.append(
            FieldViolation(
                prefix + "concurrency_limit",
                f"must be between 1 and {MAX_CONCURRENCY_LIMIT} (0 for 1)",
            )
        )


_NO_DEPENDENCIES: tuple[tuple[str, ...], tuple[str, ...], str, bool] = ((), (), "", False)


def _check_dependencies(
    fields: dict[str, Any], prefix: str, out: list[FieldViolation]
) -> tuple[tuple[str, ...], tuple[str, ...], str, bool]:
    """``after``, ``after_refs``, ``ref`` and the policy of a submit that sets some."""
    after: tuple[str, ...] = ()
    if "after" in fields:
        after = _check_after(fields["after"], prefix + "after", out)
    after_refs = tuple(dict.fromkeys(fields.get("after_refs", ())))
    for ref in after_refs:
        check_text(ref, prefix + "after_refs", out, max_length=MAX_NAME_LENGTH)
    ref = fields.get("ref", "")
    if ref:
        check_text(ref, prefix + "ref", out, max_length=MAX_NAME_LENGTH)
    policy = fields.get("dependency_policy", 0)
    if policy not in task_pb2.DependencyPolicy.values():
        out.append(FieldViolation(prefix + "dependency_policy", f"{policy} is not a value"))
    return after, after_refs, ref, policy == task_pb2.DEPENDENCY_POLICY_RUN


def _check_after(values: Sequence[str], field: str, out: list[FieldViolation]) -> tuple[str, ...]:
    """Dependency ids: task ids in canonical lowercase text, each once."""
    if len(values) > MAX_AFTER:
        out.append(FieldViolation(field, f"must list at most {MAX_AFTER} tasks"))
        return ()
    ids: dict[str, None] = {}
    for value in values:
        parsed = parse_task_id(value)
        if parsed is None:
            out.append(FieldViolation(field, f"{value[:64]!r} is not a task id (a UUID)"))
        else:
            ids[str(parsed)] = None
    return tuple(ids)


_DEFAULT_TIMEOUT_MS = int(defaults.DEFAULT_TIMEOUT_S * 1000)
_DEFAULT_RETRY = (
    int(defaults.DEFAULT_RETRY_INITIAL_S * 1000),
    int(defaults.DEFAULT_RETRY_MAX_S * 1000),
    defaults.DEFAULT_RETRY_MULTIPLIER,
    defaults.DEFAULT_RETRY_JITTER,
)


@functools.lru_cache(maxsize=256)
def _content_type_problem(value: str) -> bool:
    """Whether a content type breaks a rule of :func:`check_text` (which says which);
    cached, since a batch's tasks mostly share one."""
    problems: list[FieldViolation] = []
    check_text(value, "", problems, max_length=MAX_CONTENT_TYPE_LENGTH)
    return bool(problems)


_last_now: tuple[datetime, int] | None = None


def _unix_ms(now: datetime) -> int:
    """``now`` in Unix milliseconds; the last one is kept, since every task of a batch is
    checked against the same ``now``."""
    global _last_now
    last = _last_now
    if last is not None and last[0] is now:
        return last[1]
    ms = int(now.timestamp() * 1000)
    _last_now = (now, ms)
    return ms


def _check_request_id(
    value: str, field: str, now: datetime | None, out: list[FieldViolation]
) -> str | None:
    """A client-made UUIDv7 in canonical text (either case), its time near the
    coordinator's clock. This runs for every task a client library sends: a regular
    expression checks the form, and the time is compared in integer milliseconds."""
    if not _UUID7.fullmatch(value):
        out.append(
            FieldViolation(
                field, f"{value[:40]!r} is not a UUIDv7 in canonical text (8-4-4-4-12 hex digits)"
            )
        )
        return None
    made_ms = int(value[:8] + value[9:13], 16)
    offset_ms = made_ms - _unix_ms(now or datetime.now(UTC))
    if not -_REQUEST_ID_BEHIND_MS <= offset_ms <= _REQUEST_ID_AHEAD_MS:
        made = datetime.fromtimestamp(made_ms / 1000, UTC)
        apart = timedelta(seconds=round(abs(offset_ms) / 1000))
        out.append(
            FieldViolation(
                field,
                f"was made at {made:%Y-%m-%d %H:%M:%S} UTC, {apart} "
                f"{'behind' if offset_ms < 0 else 'ahead of'} the coordinator's clock; "
                "it must be within an hour before and 5 minutes after it (check the client's "
                "clock, and make a new request_id for a new task)",
            )
        )
        return None
    return value.lower()


def request_fingerprint(task: NewTask) -> bytes:
    """What makes two submits "the same request" (see ``_with_hash``)."""
    return task.request_hash or _with_hash(task, force=True).request_hash


def _check_run_at(
    value: Any, prefix: str, now: datetime | None, out: list[FieldViolation]
) -> datetime | None:
    run_at = check_timestamp(value, prefix + "run_at", out)
    if run_at is not None and run_at - (now or datetime.now(UTC)) > MAX_RUN_AT_AHEAD:
        out.append(FieldViolation(prefix + "run_at", "must be less than a year in the future"))
    return run_at


def _check_retry_policy(
    policy: task_pb2.RetryPolicy, prefix: str, out: list[FieldViolation]
) -> tuple[int, int, float, float]:
    initial_ms = _duration_ms(
        policy.initial_backoff if policy.HasField("initial_backoff") else None,
        prefix + "retry_policy.initial_backoff",
        MAX_BACKOFF,
        out,
    )
    max_ms = _duration_ms(
        policy.max_backoff if policy.HasField("max_backoff") else None,
        prefix + "retry_policy.max_backoff",
        MAX_BACKOFF,
        out,
    )
    initial_ms = initial_ms or int(defaults.DEFAULT_RETRY_INITIAL_S * 1000)
    max_ms = max_ms or max(initial_ms, int(defaults.DEFAULT_RETRY_MAX_S * 1000))
    if max_ms < initial_ms:
        out.append(
            FieldViolation(prefix + "retry_policy.max_backoff", "must not be below initial_backoff")
        )
    multiplier = policy.multiplier or defaults.DEFAULT_RETRY_MULTIPLIER
    if not 1.0 <= multiplier <= MAX_MULTIPLIER:
        out.append(
            FieldViolation(
                prefix + "retry_policy.multiplier", f"must be between 1 and {MAX_MULTIPLIER}"
            )
        )
    # A set retry_policy means its jitter is meant, zero included.
    jitter = policy.jitter
    if not 0.0 <= jitter <= 1.0:
        out.append(FieldViolation(prefix + "retry_policy.jitter", "must be between 0 and 1"))
    return initial_ms, max_ms, multiplier, jitter


def _check_labels(labels: dict[str, str], prefix: str, out: list[FieldViolation]) -> None:
    if len(labels) > MAX_LABELS:
        out.append(FieldViolation(prefix + "labels", f"must have at most {MAX_LABELS} entries"))
    for key, value in labels.items():
        field = f"{prefix}labels[{key[:MAX_LABEL_KEY_LENGTH]!r}]"
        if not key:
            out.append(FieldViolation(field, "key must not be empty"))
        else:
            check_text(key, field + " key", out, max_length=MAX_LABEL_KEY_LENGTH)
        check_text(value, field, out, max_length=MAX_LABEL_VALUE_LENGTH, identifier=False)


def _with_hash(task: NewTask, *, force: bool = False) -> NewTask:
    """Fingerprints what makes two submits "the same request" for idempotency.

    run_at and traceparent are left out on purpose: a client retrying "in 10 minutes" or from
    a new trace span computes new values for them, and is still sending the same task.
    """
    if task.idempotency_key is None and not force:
        return task
    digest = hashlib.sha256()
    head = json.dumps(
        [
            task.queue,
            task.type,
            task.content_type,
            task.priority,
            task.max_attempts,
            task.timeout_ms,
            task.retry_initial_ms,
            task.retry_max_ms,
            task.retry_multiplier,
            task.retry_jitter,
            sorted(task.labels.items()),
            # Only when set, so the fingerprints of tasks without a key stay as they were.
            *([task.concurrency_key, task.concurrency_limit] if task.concurrency_key else []),
            *([task.deadline.isoformat()] if task.deadline else []),
            # Only when set, so the fingerprints stored before dependencies still match.
            *(
                [sorted(task.after), sorted(task.after_refs), task.run_on_failure]
                if task.after or task.after_refs
                else []
            ),
        ]
    ).encode()
    digest.update(len(head).to_bytes(8, "big"))
    digest.update(head)
    digest.update(task.payload)
    return dataclasses.replace(task, request_hash=digest.digest())


def validate_submit_one(
    req: task_service_pb2.SubmitTaskRequest, *, max_payload_bytes: int
) -> NewTask:
    task, violations = validate_submit(req, max_payload_bytes=max_payload_bytes)
    if violations or task is None:
        raise InvalidArgument(violations)
    if task.after_refs:
        raise InvalidArgument(
            [
                FieldViolation(
                    "after_refs",
                    "names tasks of the same SubmitTasks request: use after (task ids) in "
                    "SubmitTask",
                )
            ]
        )
    return task


SUBMIT_SLICE = 50
"""Tasks of a SubmitTasks batch validated (and planned, ``lifecycle/submits.py``) between
two yields to the event loop: a batch of 500 is ~10 ms of validation, which would
otherwise hold every other call on the loop (another tenant's submit, a dispatch round)
for all of it."""


async def validate_submit_batch(
    req: task_service_pb2.SubmitTasksRequest, *, max_payload_bytes: int
) -> list[NewTask]:
    """A SubmitTasks request's tasks, validated a slice of SUBMIT_SLICE at a time with a
    yield to the event loop between slices; every violation, named by its index in the
    batch, raised together (INVALID_ARGUMENT)."""
    if not req.tasks:
        raise InvalidArgument([FieldViolation("tasks", "must contain at least one task")])
    if len(req.tasks) > MAX_BATCH:
        raise InvalidArgument([FieldViolation("tasks", f"must contain at most {MAX_BATCH} tasks")])
    tasks: list[NewTask] = []
    violations: list[FieldViolation] = []
    now = datetime.now(UTC)
    for i, one in enumerate(req.tasks):
        if i and not i % SUBMIT_SLICE:
            await asyncio.sleep(0)
        task, bad = validate_submit(one, max_payload_bytes=max_payload_bytes, now=now)
        if task is not None:
            tasks.append(task)
        else:
            # The field paths are named by the task's place only when one is wrong: a
            # string made per task costs more than the check it names.
            violations.extend(FieldViolation(f"tasks[{i}].{v.field}", v.description) for v in bad)
    if violations:
        raise InvalidArgument(violations)
    if any(t.ref or t.after_refs for t in tasks):
        check_dag(tasks)
    return tasks


def check_dag(tasks: Sequence[NewTask]) -> None:
    """Refs unique, every after_ref naming a task of the request, and no cycle
    (INVALID_ARGUMENT naming the field, the ref or the cycle)."""
    violations: list[FieldViolation] = []
    index: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.ref:
            if task.ref in index:
                violations.append(
                    FieldViolation(
                        f"tasks[{i}].ref", f"{task.ref!r} is also tasks[{index[task.ref]}]'s ref"
                    )
                )
            index.setdefault(task.ref, i)
    graph: dict[int, list[int]] = {}
    for i, task in enumerate(tasks):
        for ref in task.after_refs:
            if ref not in index:
                violations.append(
                    FieldViolation(
                        f"tasks[{i}].after_refs",
                        f"{ref!r} is not the ref of a task of this request",
                    )
                )
            else:
                graph.setdefault(i, []).append(index[ref])
    if violations:
        raise InvalidArgument(violations)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(tasks[i].ref for i in reversed(exc.args[1]))
        raise InvalidArgument(
            [
                FieldViolation(
                    "tasks", f"after_refs make a cycle ({cycle}): a task would wait for itself"
                )
            ]
        ) from None


def validate_task_id(value: str, field: str = "id") -> uuid.UUID:
    if not value:
        raise InvalidArgument([FieldViolation(field, "must not be empty")])
    parsed = parse_task_id(value)
    if parsed is None:
        raise InvalidArgument(
            [FieldViolation(field, f"{value[:64]!r} is not a task id (a UUID such as 0190...)")]
        )
    return parsed


@dataclass(frozen=True)
class ListFilter:
    queue: str | None
    state: int | None
    type: str | None
    page_size: int
    after_id: uuid.UUID | None
    #: Labels every task must carry (as a JSON object; None: any).
    labels: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def check_page_size(value: int, out: list[FieldViolation]) -> int:
    """A list call's ``page_size``: 0 (the default) to MAX_PAGE_SIZE; the size to use."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        out.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    return value or DEFAULT_PAGE_SIZE


def validate_list(req: task_service_pb2.ListTasksRequest) -> ListFilter:
    out: list[FieldViolation] = []
    check_name(req.queue, "queue", out, required=False)
    check_name(req.type, "type", out, required=False)
    if req.state not in task_pb2.TaskState.values():  # an open enum: any int32 arrives
        out.append(FieldViolation("state", f"{req.state} is not a TaskState value"))
    page_size = check_page_size(req.page_size, out)
    after: uuid.UUID | None = None
    if req.page_token:
        after = parse_task_id(req.page_token)
        if after is None:
            out.append(FieldViolation("page_token", "is not a token from a previous ListTasks"))
    _check_labels(dict(req.labels), "", out)  # the rules of a submit's labels
    created_after = _time_or_none(req, "created_after", out)
    created_before = _time_or_none(req, "created_before", out)
    if out:
        raise InvalidArgument(out)
    return ListFilter(
        queue=req.queue or None,
        state=req.state or None,
        type=req.type or None,
        page_size=page_size,
        after_id=after,
        labels=json.dumps(dict(req.labels)) if req.labels else None,
        created_after=created_after,
        created_before=created_before,
    )


def _time_or_none(msg: Any, name: str, out: list[FieldViolation]) -> datetime | None:
    """A Timestamp field of a filter as an aware datetime; None when unset."""
    if not msg.HasField(name):
        return None
    value = getattr(msg, name)
    try:
        when: datetime = value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        out.append(FieldViolation(name, "is not a valid time"))
        return None
    return when


# -- the worker's Hello ---------------------------------------------------------------------


@dataclass(frozen=True)
class ValidHello:
    """A checked Hello, normalised (no queues means the default queue)."""

    worker_id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    task_types: tuple[str, ...]
    credits: int
    in_flight: list[worker_service_pb2.Lease]
    resume_token: bytes
    """Empty on a worker process's first connect."""
    encryption_keys: frozenset[str] | None = None
    """The encryption keys the worker opens; None when it did not say (any key)."""


def check_key_ids(
    message: worker_service_pb2.EncryptionKeys, field: str, out: list[FieldViolation]
) -> frozenset[str]:
    """The key ids of an EncryptionKeys message (Hello's, or one sent later)."""
    if len(message.key_ids) > MAX_KEY_IDS:
        out.append(FieldViolation(field, f"must name at most {MAX_KEY_IDS} keys"))
        return frozenset()
    for i, key_id in enumerate(message.key_ids):
        if not is_key_id(key_id):
            out.append(
                FieldViolation(
                    f"{field}[{i}]",
                    "is not a key id (1 to 64 characters of letters, digits and '._:-')",
                )
            )
    return frozenset(message.key_ids)


def validate_hello(hello: worker_service_pb2.Hello) -> ValidHello:
    """Checks every field of a Hello; raises ProtocolViolation naming each bad one."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise ProtocolViolation(
            f"protocol version {hello.protocol_version} is not supported; this coordinator "
            f"speaks {PROTOCOL_VERSION}"
        )
    out: list[FieldViolation] = []
    if not hello.worker_id:
        out.append(FieldViolation("hello.worker_id", "must not be empty"))
    else:
        check_text(hello.worker_id, "hello.worker_id", out, max_length=MAX_NAME_LENGTH)
    check_text(hello.hostname, "hello.hostname", out, max_length=MAX_HOSTNAME_LENGTH)
    if hello.pid < 0:
        out.append(FieldViolation("hello.pid", "must not be negative"))
    if len(hello.queues) > MAX_HELLO_QUEUES:
        out.append(FieldViolation("hello.queues", f"must name at most {MAX_HELLO_QUEUES} queues"))
    else:
        for i, queue in enumerate(hello.queues):
            check_name(queue, f"hello.queues[{i}]", out, required=True)
    if not hello.task_types:
        out.append(
            FieldViolation(
                "hello.task_types",
                "must list the task types this worker has handlers for; a worker is only "
                "assigned the types it names (none means none, not any)",
            )
        )
    elif len(hello.task_types) > MAX_HELLO_TYPES:
        out.append(FieldViolation("hello.task_types", f"must name at most {MAX_HELLO_TYPES} types"))
    else:
        for i, task_type in enumerate(hello.task_types):
            check_name(task_type, f"hello.task_types[{i}]", out, required=True)
    if not 0 <= hello.credits <= MAX_CREDIT:
        out.append(FieldViolation("hello.credits", f"must be between 0 and {MAX_CREDIT}"))
    if len(hello.in_flight) > MAX_CREDIT:
        out.append(FieldViolation("hello.in_flight", f"must list at most {MAX_CREDIT} leases"))
    if hello.resume_token and len(hello.resume_token) != RESUME_TOKEN_BYTES:
        out.append(
            FieldViolation(
                "hello.resume_token",
                f"must be empty or the {RESUME_TOKEN_BYTES} bytes of an earlier Welcome's "
                "resume_token, unchanged",
            )
        )
    keys = None
    if hello.HasField("encryption_keys"):
        keys = check_key_ids(hello.encryption_keys, "hello.encryption_keys.key_ids", out)
    if out:
        raise ProtocolViolation(
            "invalid Hello: " + "; ".join(f"{v.field}: {v.description}" for v in out[:5]), out
        )
    return ValidHello(
        worker_id=hello.worker_id,
        hostname=hello.hostname,
        pid=hello.pid,
        queues=tuple(dict.fromkeys(hello.queues)) or (defaults.DEFAULT_QUEUE,),
        task_types=tuple(dict.fromkeys(hello.task_types)),
        credits=hello.credits,
        in_flight=list(hello.in_flight),
        resume_token=hello.resume_token,
        encryption_keys=keys,
    )


@dataclass(frozen=True)
class TaskUpdate:
    """A checked UpdateTask: the fields to change (None: kept)."""

    task_id: uuid.UUID
    etag: str
    priority: int | None
    max_attempts: int | None
    labels: str | None
    """JSON, as the labels column takes it."""
    run_at: datetime | None


def validate_update(req: task_service_pb2.UpdateTaskRequest) -> TaskUpdate:
    """Checks an UpdateTask request (its fields by the same rules as a submit's)."""
    task_id = validate_task_id(req.id)
    out: list[FieldViolation] = []
    priority = req.priority if req.HasField("priority") else None
    if priority is not None and not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        out.append(
            FieldViolation("priority", f"must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
        )
    max_attempts = req.max_attempts if req.HasField("max_attempts") else None
    if max_attempts is not None and not 1 <= max_attempts <= MAX_ATTEMPTS:
        out.append(FieldViolation("max_attempts", f"must be between 1 and {MAX_ATTEMPTS}"))
    run_at = _check_run_at(req.run_at, "", None, out) if req.HasField("run_at") else None
    labels = None
    if req.update_labels:
        _check_labels(dict(req.labels), "", out)
        labels = json.dumps(dict(req.labels))
    elif req.labels:
        out.append(FieldViolation("labels", "are applied only with update_labels set"))
    if priority is None and max_attempts is None and run_at is None and labels is None:
        out.append(
            FieldViolation(
                "id", "nothing to change: set priority, run_at, max_attempts or update_labels"
            )
        )
    check_text(req.etag, "etag", out, max_length=64)
    if out:
        raise InvalidArgument(out)
    return TaskUpdate(task_id, req.etag, priority, max_attempts, labels, run_at)
