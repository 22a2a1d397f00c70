"""Turns store rows and validated requests into ``conveyor.v1`` messages."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.coordinator.validation import NewTask
from conveyor.v1 import task_pb2, worker_service_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def duration_ms(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(milliseconds=ms))
    return d


def _labels(value: Any) -> dict[str, str]:
    if not value:
        return {}
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
        idempotency_key=row["idempotency_key"] or "",
        run_at=timestamp(row["run_at"]),
        timeout=duration_ms(row["timeout_ms"]),
        retry_policy=task_pb2.RetryPolicy(
            initial_backoff=duration_ms(row["retry_initial_ms"]),
            max_backoff=duration_ms(row["retry_max_ms"]),
            multiplier=row["retry_multiplier"],
            jitter=row["retry_jitter"],
        ),
        result=row["result"] or b"",
        last_error=row["last_error"],
        worker_id=row["worker_id"] or "",
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        finish_time=timestamp(row["finish_time"]),
        labels=_labels(row["labels"]),
        traceparent=row["traceparent"],
    )


def task_from_new(
    tenant: str, task_id: uuid.UUID, task: NewTask, state: int, run_at: datetime, now: datetime
) -> task_pb2.Task:
    """The Task message for a row just inserted, without reading it back."""
    return task_pb2.Task(
        id=str(task_id),
        tenant=tenant,
        queue=task.queue,
        type=task.type,
        payload=task.payload,
        content_type=task.content_type,
        state=state,  # type: ignore[arg-type]
        priority=task.priority,
        attempt=0,
        max_attempts=task.max_attempts,
        idempotency_key=task.idempotency_key or "",
        run_at=timestamp(run_at),
        timeout=duration_ms(task.timeout_ms),
        retry_policy=task_pb2.RetryPolicy(
            initial_backoff=duration_ms(task.retry_initial_ms),
            max_backoff=duration_ms(task.retry_max_ms),
            multiplier=task.retry_multiplier,
            jitter=task.retry_jitter,
        ),
        create_time=timestamp(now),
        update_time=timestamp(now),
        labels=task.labels,
        traceparent=task.traceparent,
    )


def attempt_from_row(row: Mapping[str, Any]) -> task_pb2.TaskAttempt:
    return task_pb2.TaskAttempt(
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        start_time=timestamp(row["start_time"]),
        end_time=timestamp(row["end_time"]),
        outcome=row["outcome"],
        error=row["error"],
    )


def assignment_from_row(row: Mapping[str, Any]) -> worker_service_pb2.Assignment:
    return worker_service_pb2.Assignment(
        lease=worker_service_pb2.Lease(
            task_id=str(row["id"]), attempt=row["attempt"], epoch=row["lease_epoch"]
        ),
        queue=row["queue"],
        type=row["type"],
        payload=row["payload"],
        content_type=row["content_type"],
        max_attempts=row["max_attempts"],
        idempotency_key=row["idempotency_key"] or "",
        timeout=duration_ms(row["timeout_ms"]),
        labels=_labels(row["labels"]),
        traceparent=row["traceparent"],
        create_time=timestamp(row["create_time"]),
    )
