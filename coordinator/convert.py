"""Turns store rows and validated requests into ``conveyor.v1`` messages."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.coordinator.api.validation import NewTask
from conveyor.v1 import task_pb2, worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.lifecycle.leases import LeaseKey

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp (exact, and faster than Timestamp.FromDatetime)."""
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def timestamp_from_seconds(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp from Unix seconds (time.time())."""
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def maybe_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else timestamp(value)


@functools.lru_cache(maxsize=1024)
def duration_ms(ms: int) -> duration_pb2.Duration:
    """A Duration of ``ms`` milliseconds; cached, since tasks share a few values.

    Callers must not mutate the result (message constructors copy it).
    """
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


@functools.lru_cache(maxsize=256)
def retry_policy(
    initial_ms: int, max_ms: int, multiplier: float, jitter: float
) -> task_pb2.RetryPolicy:
    """The RetryPolicy message for stored values; cached like duration_ms."""
    return task_pb2.RetryPolicy(
        initial_backoff=duration_ms(initial_ms),
        max_backoff=duration_ms(max_ms),
        multiplier=multiplier,
        jitter=jitter,
    )


def _labels(value: Any) -> dict[str, str] | None:
    # Stored as jsonb, read back as text; most tasks have none, so skip the parse.
    if not value or value == "{}":
        return None
    if isinstance(value, str):
        loaded: dict[str, str] = json.loads(value)
        return loaded
    return dict(value)


def task_from_row(row: Mapping[str, Any]) -> task_pb2.Task:
    """A Task message from a row selected with ``store.tasks.TASK_COLUMNS``."""
    return task_pb2.Task(
        id=str(row["id"]),
        tenant=row["tenant"],
        queue=row["queue"],
        type=row["type"],
        payload=row["payload"],
        content_type=row["content_type"],
        state=row["state"],
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        uncounted_attempts=row["attempt_base"],
        idempotency_key=row["idempotency_key"] or "",
        run_at=maybe_timestamp(row["run_at"]),
        timeout=duration_ms(row["timeout_ms"]),
        retry_policy=retry_policy(
            row["retry_initial_ms"],
            row["retry_max_ms"],
            row["retry_multiplier"],
            row["retry_jitter"],
        ),
        result=row["result"] or b"",
        last_error=row["last_error"],
        worker_id=row["worker_id"] or "",
        create_time=maybe_timestamp(row["create_time"]),
        update_time=maybe_timestamp(row["update_time"]),
        finish_time=maybe_timestamp(row["finish_time"]),
        labels=_labels(row["labels"]),
        traceparent=row["traceparent"],
        concurrency_key=row["concurrency_key"] or "",
        concurrency_limit=row["concurrency_limit"] or 0,
        deadline=maybe_timestamp(row["deadline"]),
        etag=task_etag(row["version"]),
    )


def task_etag(version: int) -> str:
    """A task's etag (``Task.etag``): its version, which UpdateTask bumps."""
    return str(version)


_NEW_ETAG = task_etag(1)


def task_from_new(
    tenant: str,
    task_id: uuid.UUID | str,
    task: NewTask,
    state: int,
    run_at: timestamp_pb2.Timestamp,
    now: timestamp_pb2.Timestamp,
) -> task_pb2.Task:
    """The Task message for a row just inserted, without reading it back.

    This runs once per submitted task, so the shared parts are built once per batch
    (``now``, ``run_at``) or cached (durations, retry policies). The payload is not
    echoed: the submitter has it, and sending it back would double the traffic.
    """
    message = task_pb2.Task(
        id=str(task_id),
        tenant=tenant,
        queue=task.queue,
        type=task.type,
        content_type=task.content_type,
        state=state,  # type: ignore[arg-type]
        priority=task.priority,
        attempt=0,
        max_attempts=task.max_attempts,
        idempotency_key=task.idempotency_key or "",
        run_at=run_at,
        timeout=duration_ms(task.timeout_ms),
        retry_policy=retry_policy(
            task.retry_initial_ms, task.retry_max_ms, task.retry_multiplier, task.retry_jitter
        ),
        create_time=now,
        update_time=now,
        labels=task.labels or None,
        traceparent=task.traceparent,
        etag=_NEW_ETAG,
    )
    if task.concurrency_key or task.deadline:
        # Set apart: most tasks have neither, and every keyword costs per task here.
        message.concurrency_key = task.concurrency_key or ""
        message.concurrency_limit = task.concurrency_limit or 0
        if task.deadline is not None:
            message.deadline.CopyFrom(timestamp(task.deadline))
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


ID_LENGTH = 36
"""A task id's canonical text (``8-4-4-4-12`` hex digits): the length new answers assume."""


def new_answer_parts(
    tenant: str,
    task: NewTask,
    state: int,
    run_at: timestamp_pb2.Timestamp,
    now: timestamp_pb2.Timestamp,
) -> tuple[bytes, bytes]:
    """A new task's answer as one encoded entry of ``SubmitTasksResponse.results``, but
    its id: ``head + id + tail`` (the id's canonical text, encoded) is what the entry of
    ``SubmitTaskResponse(task=task_from_new(...))`` serializes to.

    Tasks of one batch mostly share every field but their id, so one encoding serves
    them all: the message built per task was the largest item of the coordinator's
    profile (12.8 % of its samples in the end-to-end phase, docs/performance.md). This
    relies on the protobuf wire format only: ``results``, ``task`` and ``Task.id`` are
    each field 1, so the id comes first, as a serializer writes it; ``deduplicated`` is
    false and left out, as a serializer leaves it.
    """
    body = task_from_new(tenant, "", task, state, run_at, now).SerializeToString()
    task_length = 2 + ID_LENGTH + len(body)
    task_field = b"\x0a" + _varint(task_length)
    head = b"\x0a" + _varint(len(task_field) + task_length) + task_field
    return head + b"\x0a" + _varint(ID_LENGTH), body


def response_entry(encoded_response: bytes) -> bytes:
    """An encoded ``SubmitTaskResponse`` as one entry of ``SubmitTasksResponse.results``."""
    return b"\x0a" + _varint(len(encoded_response)) + encoded_response


def attempt_from_row(row: Mapping[str, Any]) -> task_pb2.TaskAttempt:
    return task_pb2.TaskAttempt(
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        start_time=maybe_timestamp(row["start_time"]),
        end_time=maybe_timestamp(row["end_time"]),
        outcome=row["outcome"],
        error=row["error"],
    )


def lease_proto(task_id: str, attempt: int, epoch: int) -> worker_service_pb2.Lease:
    """The wire form of a lease (the one place a Lease message is made)."""
    return worker_service_pb2.Lease(task_id=task_id, attempt=attempt, epoch=epoch)


def to_proto(key: LeaseKey) -> worker_service_pb2.Lease:
    return lease_proto(key.task_id, key.attempt, key.epoch)


def add_assignment_from_new(
    add: Callable[..., worker_service_pb2.Assignment], new: tuple[LeaseKey, NewTask, Timestamp]
) -> None:
    """Adds the first attempt of a task just inserted as leased (the submit hand-off):
    ``new`` is (its lease, the task, the submit's time)."""
    key, task, now = new
    add(
        lease=to_proto(key),
        queue=task.queue,
        type=task.type,
        payload=task.payload,
        content_type=task.content_type,
        max_attempts=task.max_attempts,
        idempotency_key=task.idempotency_key or "",
        timeout=duration_ms(task.timeout_ms),
        labels=task.labels or None,
        traceparent=task.traceparent,
        create_time=now,
    )


_UINT64 = (1 << 64) - 1


def _int_field(tag: int, value: int | None) -> bytes:
    """An int32 or int64 field as a serializer writes it (nothing for 0 or None, as a
    message constructor leaves it unset; a negative value as ten bytes, two's complement).
    The column types keep it in range."""
    if not value:
        return b""
    if 0 < value < 0x80:
        return bytes((tag, value))
    return bytes((tag,)) + _varint(value & _UINT64)


def _head(tag: int, length: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return bytes((tag, length)) if length < 0x80 else bytes((tag,)) + _varint(length)


def _bytes_field(tag: int, value: bytes) -> bytes:
    """A string (encoded) or bytes field as a serializer writes it (nothing when empty)."""
    if not value:
        return b""
    length = len(value)
    if length < 0x80:
        return bytes((tag, length)) + value
    return bytes((tag,)) + _varint(length) + value


def assignments_from_rows(rows: Sequence[Mapping[str, Any]]) -> worker_service_pb2.ConnectResponse:
    """The Assignments message of claimed rows (``store.tasks.ASSIGNMENT_COLUMNS``), in
    row order: the message :func:`add_assignment_from_row` builds for each, made from
    encoded parts and parsed once in C.

    The rows of one claim mostly share every field but their lease, payload and
    idempotency key (one submit's tasks share even ``create_time``), so those fields are
    serialized once per combination (by protobuf itself, which also refuses what it
    would refuse in a message) and each row adds its own three. Building an Assignment
    message per row was the largest item of dispatch in the coordinator's profile (5-7 %
    of its samples in the end-to-end phase, docs/performance.md). This relies on the
    wire format only: a parser takes a message's fields in any order (the shared ones
    come before the payload here), and the message parsed from them serializes as the
    one built field by field. A row with labels is built as a message, as before.
    """
    shared: dict[tuple[Any, ...], bytes] = {}
    lease_tails: dict[tuple[int, int], bytes] = {}
    # One list of parts joined once: a payload is copied once here, however large.
    parts: list[bytes] = [b""]
    total = 0
    for row in rows:
        labels = row["labels"]
        if labels and labels != "{}":
            one = worker_service_pb2.ConnectResponse()
            add_assignment_from_row(one.assignments.assignments.add, row)
            entry = _bytes_field(0x0A, one.assignments.assignments[0].SerializeToString())
            parts.append(entry)
            total += len(entry)
            continue
        shape = (
            row["queue"], row["type"], row["content_type"], row["max_attempts"],
            row["timeout_ms"], row["traceparent"], row["create_time"],
        )  # fmt: skip
        common = shared.get(shape)
        if common is None:
            common = shared[shape] = worker_service_pb2.Assignment(
                queue=row["queue"],
                type=row["type"],
                content_type=row["content_type"],
                max_attempts=row["max_attempts"],
                timeout=duration_ms(row["timeout_ms"]),
                traceparent=row["traceparent"],
                create_time=maybe_timestamp(row["create_time"]),
            ).SerializeToString()
        # Tags: Lease.task_id 0x0A, .attempt 0x10, .epoch 0x18; Assignment.lease 0x0A,
        # .payload 0x22, .idempotency_key 0x3A; Assignments.assignments 0x0A;
        # ConnectResponse.assignments 0x12.
        attempt, epoch = numbers = (row["attempt"], row["epoch"])
        tail = lease_tails.get(numbers)
        if tail is None:
            tail = lease_tails[numbers] = _int_field(0x10, attempt) + _int_field(0x18, epoch)
        lease = _bytes_field(0x0A, str(row["id"]).encode()) + tail
        fields = _head(0x0A, len(lease)) + lease + common
        payload, key = row["payload"], row["idempotency_key"]
        size = len(fields)
        if payload:
            payload_head = _head(0x22, len(payload))
            size += len(payload_head) + len(payload)
        if key:
            key_field = _bytes_field(0x3A, key.encode())
            size += len(key_field)
        head = _head(0x0A, size)
        parts.append(head + fields)
        if payload:
            parts.append(payload_head)
            parts.append(payload)
        if key:
            parts.append(key_field)
        total += len(head) + size
    parts[0] = b"\x12" + _varint(total)
    return worker_service_pb2.ConnectResponse.FromString(b"".join(parts))


def add_assignment_from_row(
    add: Callable[..., worker_service_pb2.Assignment], row: Mapping[str, Any]
) -> None:
    """Adds the Assignment of a claimed row (``store.tasks.ASSIGNMENT_COLUMNS``)."""
    add(
        lease=lease_proto(str(row["id"]), row["attempt"], row["epoch"]),
        queue=row["queue"],
        type=row["type"],
        payload=row["payload"],
        content_type=row["content_type"],
        max_attempts=row["max_attempts"],
        idempotency_key=row["idempotency_key"] or "",
        timeout=duration_ms(row["timeout_ms"]),
        labels=_labels(row["labels"]),
        traceparent=row["traceparent"],
        create_time=maybe_timestamp(row["create_time"]),
    )
