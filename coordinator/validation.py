"""Checks API requests and turns them into normalised values, or field violations.

Nothing reaches the store unless it passed here, so a bad request writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.coordinator import config as defaults
from conveyor.coordinator.errors import FieldViolation, InvalidArgument
from conveyor.coordinator.ids import parse_task_id
from conveyor.v1 import task_pb2, task_service_pb2

MAX_NAME_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_PRIORITY = 1000
MAX_ATTEMPTS = 1000
MAX_TIMEOUT = timedelta(days=1)
MAX_BACKOFF = timedelta(days=1)
MAX_MULTIPLIER = 100.0
MAX_RUN_AT_AHEAD = timedelta(days=366)
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 63
MAX_LABEL_VALUE_LENGTH = 256
MAX_BATCH = 1000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# Queue and type names travel in metrics labels and CLI output: keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-/]*$")


@dataclass(frozen=True)
class NewTask:
    """A validated submit, ready to insert."""

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


def _check_name(value: str, field: str, out: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            out.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > MAX_NAME_LENGTH:
        out.append(FieldViolation(field, f"must be at most {MAX_NAME_LENGTH} characters"))
    elif not _NAME.match(value):
        out.append(
            FieldViolation(
                field,
                "must start with a letter or digit and contain only letters, digits and _ . : - /",
            )
        )


def _duration_ms(
    message: Any, name: str, field: str, upper: timedelta, out: list[FieldViolation]
) -> int | None:
    """Milliseconds of the Duration field ``name`` of ``message``; None when unset or bad."""
    if not message.HasField(name):
        return None
    value = getattr(message, name)
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
    """Validates one SubmitTaskRequest; field paths get ``prefix`` (``tasks[3].``)."""
    out: list[FieldViolation] = []
    queue = req.queue or defaults.DEFAULT_QUEUE
    _check_name(req.queue, prefix + "queue", out, required=False)
    _check_name(req.type, prefix + "type", out, required=True)
    if len(req.payload) > max_payload_bytes:
        out.append(
            FieldViolation(
                prefix + "payload",
                f"is {len(req.payload)} bytes, more than the limit of {max_payload_bytes}",
            )
        )
    if len(req.idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        out.append(
            FieldViolation(
                prefix + "idempotency_key",
                f"must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
            )
        )
    if not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
        out.append(
            FieldViolation(
                prefix + "priority", f"must be between {-MAX_PRIORITY} and {MAX_PRIORITY}"
            )
        )
    if req.max_attempts < 0 or req.max_attempts > MAX_ATTEMPTS:
        out.append(
            FieldViolation(
                prefix + "max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0 for the default)"
            )
        )
    if len(req.content_type) > MAX_NAME_LENGTH:
        out.append(
            FieldViolation(prefix + "content_type", f"must be at most {MAX_NAME_LENGTH} characters")
        )
    run_at: datetime | None = None
    if req.HasField("run_at"):
        now = now or datetime.now(UTC)
        if req.run_at.nanos < 0 or req.run_at.nanos > 999_999_999:
            out.append(FieldViolation(prefix + "run_at", "is not a valid timestamp"))
        else:
            run_at = req.run_at.ToDatetime(tzinfo=UTC)
            if run_at - now > MAX_RUN_AT_AHEAD:
                out.append(
                    FieldViolation(prefix + "run_at", "must be less than a year in the future")
                )
    timeout_ms = _duration_ms(req, "timeout", prefix + "timeout", MAX_TIMEOUT, out)
    initial_ms, max_ms, multiplier, jitter = _check_retry_policy(req, prefix, out)
    _check_labels(req, prefix, out)
    if len(req.traceparent) > 128:
        out.append(FieldViolation(prefix + "traceparent", "must be at most 128 characters"))
    if out:
        return None, out
    task = NewTask(
        queue=queue,
        type=req.type,
        payload=req.payload,
        content_type=req.content_type or defaults.DEFAULT_CONTENT_TYPE,
        priority=req.priority,
        max_attempts=req.max_attempts or defaults.DEFAULT_MAX_ATTEMPTS,
        idempotency_key=req.idempotency_key or None,
        request_hash=b"",
        run_at=run_at,
        timeout_ms=timeout_ms or int(defaults.DEFAULT_TIMEOUT_S * 1000),
        retry_initial_ms=initial_ms,
        retry_max_ms=max_ms,
        retry_multiplier=multiplier,
        retry_jitter=jitter,
        labels=dict(req.labels),
        traceparent=req.traceparent,
    )
    return _with_hash(task), []


def _check_retry_policy(
    req: task_service_pb2.SubmitTaskRequest, prefix: str, out: list[FieldViolation]
) -> tuple[int, int, float, float]:
    policy = req.retry_policy
    initial_ms = _duration_ms(
        policy, "initial_backoff", prefix + "retry_policy.initial_backoff", MAX_BACKOFF, out
    )
    max_ms = _duration_ms(
        policy, "max_backoff", prefix + "retry_policy.max_backoff", MAX_BACKOFF, out
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
    jitter = policy.jitter if req.HasField("retry_policy") else defaults.DEFAULT_RETRY_JITTER
    if not 0.0 <= jitter <= 1.0:
        out.append(FieldViolation(prefix + "retry_policy.jitter", "must be between 0 and 1"))
    return initial_ms, max_ms, multiplier, jitter


def _check_labels(
    req: task_service_pb2.SubmitTaskRequest, prefix: str, out: list[FieldViolation]
) -> None:
    if len(req.labels) > MAX_LABELS:
        out.append(FieldViolation(prefix + "labels", f"must have at most {MAX_LABELS} entries"))
    for key, value in req.labels.items():
        if not key or len(key) > MAX_LABEL_KEY_LENGTH:
            out.append(
                FieldViolation(
                    f"{prefix}labels[{key!r}]",
                    f"key must be 1 to {MAX_LABEL_KEY_LENGTH} characters",
                )
            )
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            out.append(
                FieldViolation(
                    f"{prefix}labels[{key!r}]",
                    f"value must be at most {MAX_LABEL_VALUE_LENGTH} characters",
                )
            )


def _with_hash(task: NewTask) -> NewTask:
    """Fingerprints what makes two submits "the same request" for idempotency.

    run_at and traceparent are left out on purpose: a client retrying "in 10 minutes" or from
    a new trace span computes new values for them, and is still sending the same task.
    """
    if task.idempotency_key is None:
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
        ]
    ).encode()
    digest.update(len(head).to_bytes(8, "big"))
    digest.update(head)
    digest.update(task.payload)
    return NewTask(**{**task.__dict__, "request_hash": digest.digest()})


def validate_submit_one(
    req: task_service_pb2.SubmitTaskRequest, *, max_payload_bytes: int
) -> NewTask:
    task, violations = validate_submit(req, max_payload_bytes=max_payload_bytes)
    if violations or task is None:
        raise InvalidArgument(violations)
    return task


def validate_submit_batch(
    req: task_service_pb2.SubmitTasksRequest, *, max_payload_bytes: int
) -> list[NewTask]:
    if not req.tasks:
        raise InvalidArgument([FieldViolation("tasks", "must contain at least one task")])
    if len(req.tasks) > MAX_BATCH:
        raise InvalidArgument([FieldViolation("tasks", f"must contain at most {MAX_BATCH} tasks")])
    tasks: list[NewTask] = []
    violations: list[FieldViolation] = []
    now = datetime.now(UTC)
    for i, one in enumerate(req.tasks):
        task, bad = validate_submit(
            one, max_payload_bytes=max_payload_bytes, prefix=f"tasks[{i}].", now=now
        )
        violations.extend(bad)
        if task is not None:
            tasks.append(task)
    if violations:
        raise InvalidArgument(violations)
    return tasks


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


def validate_list(req: task_service_pb2.ListTasksRequest) -> ListFilter:
    out: list[FieldViolation] = []
    _check_name(req.queue, "queue", out, required=False)
    _check_name(req.type, "type", out, required=False)
    if req.state not in task_pb2.TaskState.values():
        out.append(FieldViolation("state", f"{req.state} is not a TaskState value"))
    if req.page_size < 0 or req.page_size > MAX_PAGE_SIZE:
        out.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    after: uuid.UUID | None = None
    if req.page_token:
        after = parse_task_id(req.page_token)
        if after is None:
            out.append(FieldViolation("page_token", "is not a token from a previous ListTasks"))
    if out:
        raise InvalidArgument(out)
    return ListFilter(
        queue=req.queue or None,
        state=req.state or None,
        type=req.type or None,
        page_size=req.page_size or DEFAULT_PAGE_SIZE,
        after_id=after,
    )
