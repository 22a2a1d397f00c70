"""The worker's TaskContext, whose task fields are read from the assignment when first
read, is the context the constructor makes."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from types import MappingProxyType

import pytest

from conveyor.transport._records import decoder_on_read
from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker import TaskContext
from conveyor.worker import _context as context
from conveyor.worker._context import _FROM_ASSIGNMENT, CancellationSignal, started_context

SIGNAL = CancellationSignal()


def _assignment(full: bool) -> pb.Assignment:
    assignment = pb.Assignment(
        lease=pb.Lease(task_id="0190-abc", attempt=2, epoch=7),
        type="send",
        queue="emails",
    )
    if full:
        assignment.max_attempts = 5
        assignment.idempotency_key = "k1"
        assignment.labels["team"] = "growth"
        assignment.traceparent = "00-abc-def-01"
        assignment.create_time.FromSeconds(1_700_000_000)
        assignment.create_time.nanos = 250_000_000
    return assignment


def _started(assignment: pb.Assignment) -> TaskContext:
    return started_context(
        assignment,
        deadline=12.5,
        content_type="application/json",
        worker_id="w-1",
        tenant="acme",
        cancelled=SIGNAL,
        calls=None,
    )


def _made(assignment: pb.Assignment) -> TaskContext:
    created = assignment.create_time
    return TaskContext(
        task_id=assignment.lease.task_id,
        type=assignment.type,
        queue=assignment.queue,
        attempt=assignment.lease.attempt,
        max_attempts=assignment.max_attempts,
        idempotency_key=assignment.idempotency_key,
        deadline=12.5,
        labels=MappingProxyType(dict(assignment.labels)),
        content_type="application/json",
        traceparent=assignment.traceparent,
        create_time=(
            datetime.fromtimestamp(created.seconds + created.nanos / 1e9, UTC)
            if assignment.HasField("create_time")
            else None
        ),
        worker_id="w-1",
        tenant="acme",
        epoch=assignment.lease.epoch,
        cancelled=SIGNAL,
    )


def test_the_worker_sets_every_field_the_assignment_does_not_give() -> None:
    # started_context sets these itself: a field added to TaskContext must be one or
    # the other (and then given in started_context or decoded in _decode).
    ctx = _started(_assignment(full=True))
    for f in dataclasses.fields(TaskContext):
        if f.name not in _FROM_ASSIGNMENT:
            assert f.name in {"deadline", "content_type", "worker_id", "tenant", "cancelled"} | {
                "_logger",
                "_calls",
            }, f.name
    assert {f.name for f in dataclasses.fields(TaskContext)} >= _FROM_ASSIGNMENT
    assert ctx.deadline == 12.5


@pytest.mark.parametrize("full", [True, False], ids=["every-field", "sparse"])
def test_every_field_reads_as_the_constructor_makes_it(full: bool) -> None:
    made = _made(_assignment(full))
    for f in dataclasses.fields(TaskContext):
        ctx = _started(_assignment(full))  # a fresh one per field: the first read decodes
        assert getattr(ctx, f.name) == getattr(made, f.name), f.name
        assert ctx == made
    ctx = _started(_assignment(full))
    assert repr(ctx) == repr(made)
    assert ctx.log_fields() == made.log_fields()
    assert ctx.fencing_token == made.fencing_token


def test_lets_the_assignment_go_once_decoded_and_stays_frozen() -> None:
    ctx = _started(_assignment(full=True))
    assert hasattr(ctx, "_assignment")
    assert ctx.task_id == "0190-abc"
    assert not hasattr(ctx, "_assignment")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.queue = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="'TaskContext' object has no attribute 'nope'"):
        ctx.nope  # type: ignore[attr-defined]  # noqa: B018


def test_threads_reading_it_at_once_agree() -> None:
    made = _made(_assignment(full=True))
    for _ in range(50):
        ctx = _started(_assignment(full=True))
        seen: list[dict[str, object]] = []
        barrier = threading.Barrier(4)

        def read(
            ctx: TaskContext = ctx,
            seen: list[dict[str, object]] = seen,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            seen.append(ctx.log_fields())

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == [made.log_fields()] * 4


def test_a_read_whose_assignment_another_thread_dropped_first_still_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The window between decoding and dropping the assignment, made certain: a sync
    # handler's thread decoded the same context meanwhile and dropped it first.
    decode = context._decode

    slot = context._DecodedOnRead._assignment  # type: ignore[attr-defined]

    def decode_and_lose_the_race(ctx: TaskContext, assignment: pb.Assignment) -> None:
        decode(ctx, assignment)
        slot.__delete__(ctx)

    racing = decoder_on_read(slot, context._FROM_ASSIGNMENT, decode_and_lose_the_race)
    monkeypatch.setattr(context, "_read_task_field", racing)
    ctx = _started(_assignment(full=True))
    assert ctx.task_id == "0190-abc"
    assert ctx == _made(_assignment(full=True))
