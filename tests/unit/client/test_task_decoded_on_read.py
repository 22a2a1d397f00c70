"""A Task decoded when first read (submit answers) is the Task ``from_proto`` makes."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.client import Task, TaskState
from conveyor.client import _models as models
from conveyor.transport._records import decoder_on_read
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


def _full() -> task_pb2.Task:
    return task_pb2.Task(
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
        uncounted_attempts=1,
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
        etag="e1",
    )


MESSAGES = [
    pytest.param(_full(), id="every-field"),
    pytest.param(task_pb2.Task(id="t", state=task_pb2.TASK_STATE_PENDING), id="sparse"),
    pytest.param(task_pb2.Task(), id="empty"),
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_every_field_reads_as_from_proto_makes_it(msg: task_pb2.Task) -> None:
    eager = Task.from_proto(msg)
    for f in dataclasses.fields(Task):
        lazy = Task._from_wire(msg)  # a fresh one per field: the first read decodes
        assert getattr(lazy, f.name) == getattr(eager, f.name), f.name
        assert lazy == eager


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(repr, id="repr"),
        pytest.param(hash, id="hash"),
        pytest.param(lambda t: pickle.loads(pickle.dumps(t)), id="pickle"),
        pytest.param(copy.copy, id="copy"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(dataclasses.asdict, id="asdict"),
        pytest.param(lambda t: dataclasses.replace(t, priority=9).payload, id="replace"),
        pytest.param(lambda t: t.attempt_summary, id="property"),
        pytest.param(lambda t: t.json(), id="method"),
    ],
)
def test_whatever_reads_it_first_sees_the_same_task(use: object) -> None:
    msg = _full()
    eager = Task.from_proto(msg)
    assert callable(use)
    assert use(Task._from_wire(msg)) == use(eager)


def test_is_equal_both_ways_and_frozen() -> None:
    msg = _full()
    lazy, eager = Task._from_wire(msg), Task.from_proto(msg)
    assert eager == lazy
    assert lazy == eager
    assert {lazy, eager} == {eager}
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.queue = "other"  # type: ignore[misc]
    assert lazy.state is TaskState.SUCCEEDED


def test_lets_the_message_go_once_decoded() -> None:
    task = Task._from_wire(_full())
    assert task.id == "0190-abc"
    assert not hasattr(task, "_wire")


def test_an_unknown_attribute_is_the_usual_error_and_decodes_nothing() -> None:
    task = Task._from_wire(_full())
    with pytest.raises(AttributeError, match="'Task' object has no attribute 'nope'"):
        task.nope  # type: ignore[attr-defined]  # noqa: B018
    assert hasattr(task, "_wire")  # still undecoded
    made = Task(id="t", state=TaskState.PENDING, queue="q", type="x")
    with pytest.raises(AttributeError, match="'Task' object has no attribute 'nope'"):
        made.nope  # type: ignore[attr-defined]  # noqa: B018


def _read_at_once(task: Task, threads: int) -> list[Task]:
    seen: list[Task] = []
    barrier = threading.Barrier(threads)

    def read() -> None:
        barrier.wait()
        seen.append(dataclasses.replace(task))

    started = [threading.Thread(target=read) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return seen


def test_threads_reading_it_at_once_agree() -> None:
    msg = _full()
    eager = Task.from_proto(msg)
    for _ in range(50):
        assert _read_at_once(Task._from_wire(msg), 4) == [eager] * 4


def test_a_read_whose_message_another_thread_dropped_first_still_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The window between decoding and dropping the message, made certain: another
    # thread decoded the same Task meanwhile and dropped the message first.
    decode = models._decode_task
    eager = Task.from_proto(_full())

    slot = models._DecodedOnRead._wire  # type: ignore[attr-defined]

    def decode_and_lose_the_race(task: Task, msg: task_pb2.Task) -> None:
        decode(task, msg)
        slot.__delete__(task)

    racing = decoder_on_read(slot, models._TASK_FIELD_NAMES, decode_and_lose_the_race)
    monkeypatch.setattr(models, "_read_task_field", racing)
    task = Task._from_wire(_full())
    assert task.id == "0190-abc"
    assert task == eager
