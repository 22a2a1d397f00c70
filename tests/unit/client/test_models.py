"""Conversions between the wire protos and the client's dataclasses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.client import (
    AttemptOutcome,
    QueueStats,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskSpec,
    TaskState,
)
from conveyor.client._models import parse_state_name, state_to_proto, task_spec
from conveyor.v1 import task_pb2

WHEN = datetime(2025, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _dur(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def test_task_from_proto_converts_every_field() -> None:
    msg = task_pb2.Task(
        id="0190-abc",
        tenant="acme",
        queue="emails",
        type="send",
        payload=b'{"to":"ada"}',
        content_type="application/json",
        state=task_pb2.TASK_STATE_SUCCEEDED,
        priority=5,
        attempt=2,
        max_attempts=4,
        idempotency_key="k1",
        run_at=_ts(WHEN),
        timeout=_dur(30),
        retry_policy=task_pb2.RetryPolicy(
            initial_backoff=_dur(2), max_backoff=_dur(60), multiplier=3, jitter=0.1
        ),
        result=b'{"ok": true}',
        last_error="first try failed",
        worker_id="w-7",
        create_time=_ts(WHEN),
        update_time=_ts(WHEN + timedelta(seconds=1)),
        finish_time=_ts(WHEN + timedelta(seconds=2)),
        labels={"team": "growth"},
        traceparent="00-abc-def-01",
    )
    task = Task.from_proto(msg)
    assert task.id == "0190-abc"
    assert task.tenant == "acme"
    assert (task.queue, task.type) == ("emails", "send")
    assert task.payload == b'{"to":"ada"}'
    assert task.state is TaskState.SUCCEEDED
    assert (task.priority, task.attempt, task.max_attempts) == (5, 2, 4)
    assert task.idempotency_key == "k1"
    assert task.run_at == WHEN
    assert task.run_at is not None and task.run_at.tzinfo is UTC
    assert task.timeout == timedelta(seconds=30)
    assert task.retry_policy == RetryPolicy(
        initial_backoff=timedelta(seconds=2),
        max_backoff=timedelta(seconds=60),
        multiplier=3,
        jitter=0.1,
    )
    assert task.json() == {"ok": True}
    assert task.last_error == "first try failed"
    assert task.worker_id == "w-7"
    assert task.update_time == WHEN + timedelta(seconds=1)
    assert task.finish_time == WHEN + timedelta(seconds=2)
    assert task.labels == {"team": "growth"}
    assert task.traceparent == "00-abc-def-01"
    assert task.is_terminal


def test_task_from_minimal_proto_uses_none_for_unset_fields() -> None:
    task = Task.from_proto(task_pb2.Task(id="t", state=task_pb2.TASK_STATE_PENDING))
    assert task.run_at is None and task.create_time is None and task.finish_time is None
    assert task.idempotency_key is None and task.last_error is None and task.worker_id is None
    assert task.timeout is None and task.retry_policy is None
    assert task.result == b"" and task.json() is None
    assert task.content_type == "application/json"
    assert not task.is_terminal


def test_task_is_frozen_and_hashable() -> None:
    task = Task.from_proto(task_pb2.Task(id="t", labels={"a": "b"}))
    with pytest.raises(AttributeError):
        task.id = "other"  # type: ignore[misc]
    assert task in {task}


@pytest.mark.parametrize(
    ("number", "state", "terminal"),
    [
        (task_pb2.TASK_STATE_PENDING, TaskState.PENDING, False),
        (task_pb2.TASK_STATE_SCHEDULED, TaskState.SCHEDULED, False),
        (task_pb2.TASK_STATE_RUNNING, TaskState.RUNNING, False),
        (task_pb2.TASK_STATE_SUCCEEDED, TaskState.SUCCEEDED, True),
        (task_pb2.TASK_STATE_DEAD, TaskState.DEAD, True),
        (task_pb2.TASK_STATE_CANCELLED, TaskState.CANCELLED, True),
        (task_pb2.TASK_STATE_UNSPECIFIED, TaskState.UNSPECIFIED, False),
        (42, TaskState.UNSPECIFIED, False),  # a state from a newer coordinator
    ],
)
def test_states_mirror_the_proto(number: int, state: TaskState, terminal: bool) -> None:
    task = Task.from_proto(task_pb2.Task(id="t", state=number))  # type: ignore[arg-type]
    assert task.state is state
    assert task.is_terminal is terminal
    if state is not TaskState.UNSPECIFIED:
        assert state_to_proto(state) == number
        assert state_to_proto(state.value.lower()) == number


def test_state_parsing() -> None:
    assert parse_state_name("TASK_STATE_DEAD") is TaskState.DEAD
    assert parse_state_name("nonsense") is None
    assert state_to_proto(None) == task_pb2.TASK_STATE_UNSPECIFIED
    with pytest.raises(ValueError, match="unknown task state 'finished'"):
        state_to_proto("finished")


def test_attempt_and_queue_stats_from_proto() -> None:
    attempt = TaskAttempt.from_proto(
        task_pb2.TaskAttempt(
            attempt=1,
            worker_id="w",
            start_time=_ts(WHEN),
            outcome=task_pb2.ATTEMPT_OUTCOME_TIMED_OUT,
            error="too slow",
        )
    )
    assert attempt == TaskAttempt(
        attempt=1,
        outcome=AttemptOutcome.TIMED_OUT,
        worker_id="w",
        start_time=WHEN,
        end_time=None,
        error="too slow",
    )
    stats = QueueStats.from_proto(
        task_pb2.QueueStats(name="q", pending=1, scheduled=2, running=3, dead=4, workers=5)
    )
    assert stats == QueueStats(name="q", pending=1, scheduled=2, running=3, dead=4, workers=5)
    oldest = task_pb2.QueueStats(name="q", pending=1)
    oldest.oldest_pending_time.FromDatetime(WHEN)
    assert QueueStats.from_proto(oldest).oldest_pending_time == WHEN


def test_every_attempt_outcome_of_the_proto_is_known() -> None:
    for name, number in task_pb2.AttemptOutcome.items():
        outcome = TaskAttempt.from_proto(task_pb2.TaskAttempt(outcome=number)).outcome
        assert outcome.name == name.removeprefix("ATTEMPT_OUTCOME_")


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "uncounted", "counted", "summary"),
    [
        (0, 3, 0, 0, "attempt 0 of 3"),
        (2, 3, 0, 2, "attempt 2 of 3"),
        # Redriven after three attempts, then three more: the budget reads 3 of 3.
        (6, 3, 3, 3, "attempt 3 of 3 (6 in all)"),
        # One attempt never started on a worker: it did not count.
        (2, 1, 1, 1, "attempt 1 of 1 (2 in all)"),
    ],
)
def test_attempts_read_right(
    attempt: int, max_attempts: int, uncounted: int, counted: int, summary: str
) -> None:
    task = Task.from_proto(
        task_pb2.Task(
            id="t", attempt=attempt, max_attempts=max_attempts, uncounted_attempts=uncounted
        )
    )
    assert task.uncounted_attempts == uncounted
    assert task.attempts_counted == counted
    assert task.attempt_summary == summary


def test_retry_policy_round_trip_and_defaults() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(milliseconds=500), multiplier=1.5)
    assert RetryPolicy.from_proto(policy.to_proto()) == policy
    assert RetryPolicy.from_proto(task_pb2.RetryPolicy(jitter=0.2)) == RetryPolicy()
    assert RetryPolicy().to_proto().max_backoff.seconds == 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_backoff": timedelta(0)}, "initial_backoff must be positive"),
        ({"max_backoff": timedelta(milliseconds=1)}, "max_backoff"),
        ({"multiplier": 0.5}, "multiplier must be at least 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
    ],
)
def test_retry_policy_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_spec_encodes_json_payload_compactly() -> None:
    msg = TaskSpec(type="t", payload={"a": [1, 2], "é": None}).to_proto()
    assert msg.payload == '{"a":[1,2],"é":null}'.encode()
    assert msg.content_type == "application/json"
    assert msg.queue == "default"
    assert not msg.HasField("run_at") and not msg.HasField("timeout")
    assert not msg.HasField("retry_policy")
    assert json.loads(TaskSpec(type="t").to_proto().payload) is None


def test_spec_sends_bytes_as_is() -> None:
    assert TaskSpec(type="t", payload=b"\x00\x01").to_proto().payload == b"\x00\x01"
    msg = TaskSpec(type="t", payload=b"\x00", raw=True).to_proto()
    assert msg.content_type == "application/octet-stream"
    custom = TaskSpec(type="t", payload=b"x", content_type="application/x-protobuf")
    assert custom.to_proto().content_type == "application/x-protobuf"
    with pytest.raises(TypeError, match="raw=True needs a bytes payload"):
        TaskSpec(type="t", payload={"a": 1}, raw=True).to_proto()


def test_spec_converts_times_and_options() -> None:
    local = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    msg = TaskSpec(
        type="t",
        run_at=local,
        timeout=1.5,
        max_attempts=7,
        priority=-3,
        idempotency_key="k",
        labels={"a": "b"},
        retry_policy=RetryPolicy(),
    ).to_proto()
    assert msg.run_at.ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert msg.timeout.ToTimedelta() == timedelta(seconds=1.5)
    assert (msg.max_attempts, msg.priority, msg.idempotency_key) == (7, -3, "k")
    assert dict(msg.labels) == {"a": "b"}
    assert msg.retry_policy.multiplier == 2

    before = datetime.now(UTC)
    delayed = TaskSpec(type="t", run_at=timedelta(minutes=5)).to_proto()
    run_at = delayed.run_at.ToDatetime(tzinfo=UTC)
    assert before + timedelta(minutes=5) <= run_at <= datetime.now(UTC) + timedelta(minutes=5)


def test_spec_rejects_naive_run_at() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TaskSpec(type="t", run_at=datetime(2030, 1, 1)).to_proto()


def test_task_spec_accepts_dicts() -> None:
    spec = task_spec({"type": "t", "payload": 1, "queue": "q"})
    assert spec == TaskSpec(type="t", payload=1, queue="q")
    with pytest.raises(TypeError):
        task_spec({"type": "t", "bogus": 1})


def test_a_spec_carries_its_concurrency_key_and_deadline_only_when_set() -> None:
    plain = TaskSpec(type="send").to_proto()
    assert not plain.concurrency_key and not plain.HasField("deadline")
    spec = TaskSpec(
        type="send",
        concurrency_key="customer-7",
        concurrency_limit=2,
        deadline=datetime(2030, 1, 1, tzinfo=UTC),
    ).to_proto()
    assert (spec.concurrency_key, spec.concurrency_limit) == ("customer-7", 2)
    assert spec.deadline.ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, tzinfo=UTC)
