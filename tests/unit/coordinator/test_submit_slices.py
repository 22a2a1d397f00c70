"""A SubmitTasks batch is validated and planned a slice at a time, yielding to the event
loop between slices (``validation.SUBMIT_SLICE``), with the same result as in one go:
the same tasks, the same violations (by their index in the batch), and idempotency keys
matched across slices."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.coordinator import convert
from conveyor.coordinator.api import validation
from conveyor.coordinator.errors import IdempotencyKeyConflict, InvalidArgument
from conveyor.coordinator.lifecycle.submits import SubmitGroup, Submitted, Submitter, _Plan
from conveyor.coordinator.store import tasks as tasks_store
from conveyor.coordinator.store.tasks import NewRow
from conveyor.v1 import task_service_pb2

T = task_service_pb2
SLICE = validation.SUBMIT_SLICE


async def _turns_during(work: asyncio.Task[Any]) -> int:
    """How many times another coroutine ran while ``work`` did."""
    turns = 0
    while not work.done():
        turns += 1
        await asyncio.sleep(0)
    await work
    return turns


async def test_a_large_batch_is_validated_a_slice_at_a_time() -> None:
    request = T.SubmitTasksRequest(tasks=[T.SubmitTaskRequest(type="t") for _ in range(10 * SLICE)])
    sliced = asyncio.create_task(validation.validate_submit_batch(request, max_payload_bytes=1000))
    assert await _turns_during(sliced) >= 9
    assert [t.type for t in sliced.result()] == [t.type for t in request.tasks]
    # A bad task in a later slice is named by its index in the batch.
    request.tasks[3 * SLICE + 1].priority = 10**9
    with pytest.raises(InvalidArgument) as caught:
        await validation.validate_submit_batch(request, max_payload_bytes=1000)
    assert [v.field for v in caught.value.violations] == [f"tasks[{3 * SLICE + 1}].priority"]


async def test_a_large_group_is_planned_a_slice_at_a_time_keys_matched_across_slices() -> None:
    now = datetime.now(UTC)
    keyed = [
        T.SubmitTaskRequest(type="t", idempotency_key=f"k{i % (2 * SLICE)}")
        for i in range(4 * SLICE)
    ]
    tasks = await validation.validate_submit_batch(
        T.SubmitTasksRequest(tasks=keyed), max_payload_bytes=1000
    )
    group = SubmitGroup("acme", tasks)
    rows: list[NewRow] = []
    planning = asyncio.create_task(
        Submitter._plan_group_sliced(group, _Plan.empty(), now, convert.timestamp(now), rows)
    )
    assert await _turns_during(planning) >= 3
    result = planning.result()
    assert isinstance(result, list)
    # The second half repeats the first half's keys: answered as resends, not written.
    assert [s.deduplicated for s in result] == [False] * (2 * SLICE) + [True] * (2 * SLICE)
    assert all(isinstance(s, Submitted) for s in result) and len(rows) == 2 * SLICE
    # The same key with another request in a later slice fails the group.
    clash = [*tasks[: 2 * SLICE], *await validation.validate_submit_batch(
        T.SubmitTasksRequest(tasks=[T.SubmitTaskRequest(type="other", idempotency_key="k1")]),
        max_payload_bytes=1000,
    )]  # fmt: skip
    failed = await Submitter._plan_group_sliced(
        SubmitGroup("acme", clash), _Plan.empty(), now, convert.timestamp(now), []
    )
    assert isinstance(failed, IdempotencyKeyConflict)


async def test_copy_rows_come_a_slice_at_a_time() -> None:
    records = [(i,) for i in range(5 * tasks_store.COPY_SLICE + 3)]

    async def collect() -> list[tuple[object, ...]]:
        return [r async for r in tasks_store._in_slices(records)]

    copying = asyncio.create_task(collect())
    assert await _turns_during(copying) >= 5
    assert copying.result() == records
