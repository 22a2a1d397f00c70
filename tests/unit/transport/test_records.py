"""frozen_filler: the same objects as the class's own constructor, and loud on misuse."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.client._models import Task, TaskState
from conveyor.transport._records import frozen_filler
from conveyor.v1 import task_pb2


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Point:
    x: int
    y: int = 0
    tags: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    cache: str | None = dataclasses.field(default=None, init=False, compare=False)


def test_fills_an_empty_object_as_the_constructor_would() -> None:
    fill = frozen_filler(_Point)
    filled = object.__new__(_Point)
    fill(filled, x=1, y=2, tags={"a": "b"}, cache=None)
    made = _Point(x=1, y=2, tags={"a": "b"})
    assert filled == made
    assert hash(filled) == hash(made)
    assert repr(filled) == repr(made)
    assert pickle.loads(pickle.dumps(filled)) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        filled.x = 3  # type: ignore[misc]


def test_every_field_is_required() -> None:
    fill = frozen_filler(_Point)
    with pytest.raises(TypeError, match="cache"):
        fill(object.__new__(_Point), x=1, y=2, tags={})
    with pytest.raises(TypeError):
        fill(object.__new__(_Point), 1, 2, {}, None)


def test_refuses_classes_it_would_build_wrongly() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            if self.x < 0:
                raise ValueError("negative")

    with pytest.raises(TypeError, match="slotted"):
        frozen_filler(NoSlots)
    with pytest.raises(TypeError, match="__post_init__"):
        frozen_filler(Checked)


def test_task_from_proto_equals_the_constructor() -> None:
    msg = task_pb2.Task(
        id="0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        state=task_pb2.TASK_STATE_PENDING,
        queue="q",
        type="t",
        payload=b"x",
        attempt=2,
        max_attempts=3,
        etag="e",
        tenant="acme",
        last_error="boom",
    )
    msg.create_time.FromSeconds(1_700_000_000)
    msg.timeout.FromSeconds(30)
    msg.labels["k"] = "v"
    task = Task.from_proto(msg)
    assert task == Task(
        id=msg.id,
        state=TaskState.PENDING,
        queue="q",
        type="t",
        payload=b"x",
        attempt=2,
        max_attempts=3,
        etag="e",
        tenant="acme",
        last_error="boom",
        create_time=datetime.fromtimestamp(1_700_000_000, UTC),
        timeout=timedelta(seconds=30),
        labels={"k": "v"},
    )
    assert task.timeout is not None and task.timeout.total_seconds() == 30
