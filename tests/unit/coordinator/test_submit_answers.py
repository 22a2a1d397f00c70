"""SubmitTasks answers encoded from one encoding shared by a batch (``Submitted.entry``)
say exactly what a Task message built per task says, for every shape of task."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from conveyor.coordinator import convert
from conveyor.coordinator.api.validation import validate_submit
from conveyor.coordinator.lifecycle.submits import SubmitGroup, Submitted, _GroupPlan, _Plan
from conveyor.v1 import task_pb2, task_service_pb2

NOW = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


def _request_id() -> str:
    """A UUIDv7 made at NOW (validation wants a client-made id of about now)."""
    ms = int(NOW.timestamp() * 1000)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0x2 << 62) | 12345))


def _requests() -> list[task_service_pb2.SubmitTaskRequest]:
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(NOW + timedelta(hours=1))
    deadline = timestamp_pb2.Timestamp()
    deadline.FromDatetime(NOW + timedelta(hours=2))
    R = task_service_pb2.SubmitTaskRequest
    return [
        R(queue="q", type="a", payload=b"x"),
        R(queue="q", type="a", payload=b"y"),  # the same shape: shares the encoding
        R(queue="q", type="a", payload=b"x", priority=7, max_attempts=9),
        R(queue="q2", type="b", payload=b"", run_at=later),  # SCHEDULED
        R(queue="q", type="a", payload=b"", labels={"k": "v", "é": "ü"}),
        R(queue="q", type="a", payload=b"", idempotency_key="key-1"),
        R(queue="q", type="a", payload=b"", request_id=_request_id()),
        R(queue="q", type="a", payload=b"", concurrency_key="k", concurrency_limit=3),
        R(queue="q", type="a", payload=b"", deadline=deadline),
        R(
            queue="q",
            type="a",
            payload=b"",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        R(queue="q" * 100, type="t" * 128, payload=b""),  # lengths past one varint byte
    ]


def _plan() -> list[Submitted]:
    tasks = []
    for request in _requests():
        task, violations = validate_submit(request, max_payload_bytes=1 << 20, now=NOW)
        assert task is not None and not violations, violations
        tasks.append(task)
    plan = _GroupPlan()
    now_message = convert.timestamp(NOW)
    assert plan.add(SubmitGroup("tenant-a", tasks), tasks, _Plan.empty(), NOW, now_message) is None
    return plan.out


def test_encoded_answers_match_messages_built_per_task() -> None:
    answers = _plan()
    entries = [a.entry() for a in answers]
    encoded = task_service_pb2.SubmitTasksResponse.FromString(b"".join(entries))
    expected = task_service_pb2.SubmitTasksResponse()
    for a in answers:  # building .task now: the message path
        expected.results.add(task=a.task, deduplicated=a.deduplicated)
    assert encoded == expected
    # Byte for byte, each entry as a serializer writes it, but for labels: a map's
    # entries come in an order protobuf leaves open (upb's differs between processes:
    # once in CI the two label entries came out swapped), so those compare parsed.
    for entry, result in zip(entries, expected.results, strict=True):
        if not result.task.labels:
            alone = task_service_pb2.SubmitTasksResponse(results=[result])
            assert entry == alone.SerializeToString()
    # The shared encoding was used (not only the fallback), and ids differ per task.
    assert len({r.task.id for r in encoded.results}) == len(answers)
    states = [r.task.state for r in encoded.results]
    assert states[3] == task_pb2.TASK_STATE_SCHEDULED and states[0] == task_pb2.TASK_STATE_PENDING


def test_an_answer_changed_after_planning_is_encoded_as_changed() -> None:
    # The hand-off (and dependents) change a new task's message after planning.
    answer = _plan()[0]
    answer.task.state = task_pb2.TASK_STATE_RUNNING
    answer.task.attempt = 1
    entry = task_service_pb2.SubmitTasksResponse.FromString(answer.entry()).results[0]
    assert entry.task.state == task_pb2.TASK_STATE_RUNNING and entry.task.attempt == 1


def test_tasks_of_one_shape_share_one_encoding() -> None:
    answers = _plan()
    fresh = [a._fresh for a in answers]
    assert fresh[0] is not None and fresh[1] is not None and fresh[2] is not None
    assert fresh[0][6] is fresh[1][6]
    assert fresh[0][6] is not fresh[2][6]
