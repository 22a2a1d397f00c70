"""Client-made task ids (``SubmitTaskRequest.request_id``): a resend of a submit whose answer
was lost meets its own row, on every write path (hand-off, INSERT, COPY, keyed), and is
answered with the task it made instead of writing a second one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest
from testsupport import RawWorker, error_details
from uuid_utils.compat import uuid7

from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

# The aio stub type (type-checking only: the generated module has no such class at run time).
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"


def _request(
    request_id: str, payload: bytes = b'{"n": 1}', **fields: Any
) -> task_service_pb2.SubmitTaskRequest:
    return task_service_pb2.SubmitTaskRequest(
        type="echo", payload=payload, request_id=request_id, **fields
    )


async def _rows(db: asyncpg.Connection, ids: list[str]) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[])", ids))


async def test_the_request_id_becomes_the_task_id_and_a_resend_is_deduplicated(
    stub: Stub, db: asyncpg.Connection
) -> None:
    request_id = str(uuid7())
    first = await stub.SubmitTask(_request(request_id))
    again = await stub.SubmitTask(_request(request_id))
    assert first.task.id == request_id and not first.deduplicated
    assert again.task.id == request_id and again.deduplicated
    assert await _rows(db, [request_id]) == 1


async def test_a_reused_request_id_with_another_request_is_refused(
    stub: Stub, db: asyncpg.Connection
) -> None:
    request_id = str(uuid7())
    await stub.SubmitTask(_request(request_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTask(_request(request_id, payload=b'{"n": 2}'))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_details(caught.value)
    assert info.reason == "IDEMPOTENCY_KEY_CONFLICT"
    assert info.metadata["request_id"] == request_id
    assert "make a new request_id" in (caught.value.details() or "")
    stored = await db.fetchval("SELECT payload FROM tasks WHERE id = $1::uuid", request_id)
    assert stored == b'{"n": 1}'


async def test_concurrent_resends_write_one_task(stub: Stub, db: asyncpg.Connection) -> None:
    """Sends racing each other land in one flush or in several: either way, one row."""
    request_id = str(uuid7())
    answers = await asyncio.gather(*(stub.SubmitTask(_request(request_id)) for _ in range(20)))
    assert {a.task.id for a in answers} == {request_id}
    assert sum(not a.deduplicated for a in answers) == 1
    assert await _rows(db, [request_id]) == 1


@pytest.mark.parametrize("size", [10, 200], ids=["insert", "copy"])
async def test_a_resent_batch_is_deduplicated_task_by_task(
    stub: Stub, db: asyncpg.Connection, size: int
) -> None:
    ids = [str(uuid7()) for _ in range(size)]
    batch = task_service_pb2.SubmitTasksRequest(tasks=[_request(i) for i in ids])
    first = await stub.SubmitTasks(batch)
    # The resend carries one new task too: it is written, the others are found.
    fresh = str(uuid7())
    batch.tasks.append(_request(fresh))
    again = await stub.SubmitTasks(batch)
    assert [r.task.id for r in first.results] == ids
    assert [r.task.id for r in again.results] == [*ids, fresh]
    assert [r.deduplicated for r in again.results] == [True] * size + [False]
    assert await _rows(db, [*ids, fresh]) == size + 1


async def test_a_resend_meets_a_task_handed_off_to_a_worker(
    stub: Stub, db: asyncpg.Connection, raw_workers: Callable[[], RawWorker]
) -> None:
    """The hand-off writes a fresh task leased to a waiting worker: a resend of it is
    found all the same, and the worker's credit is not lost on the way."""
    worker = raw_workers()
    await worker.connect(credits=2, types=("echo",))
    request_id = str(uuid7())

    async def handed_off() -> str:
        await stub.SubmitTask(_request(request_id))
        (assignment,) = await worker.assignments(1)
        return str(assignment.lease.task_id)

    assert await handed_off() == request_id
    again = await stub.SubmitTask(_request(request_id))
    assert again.deduplicated and again.task.state == task_pb2.TASK_STATE_RUNNING
    # The second credit still takes the next task.
    other = str(uuid7())
    await stub.SubmitTask(_request(other))
    (assignment,) = await worker.assignments(1)
    assert assignment.lease.task_id == other
    assert await _rows(db, [request_id, other]) == 2


async def test_request_ids_that_are_not_recent_uuid7_are_invalid(stub: Stub) -> None:
    old = datetime.now(UTC) - timedelta(hours=2)
    stale = uuid.UUID(int=(int(old.timestamp() * 1000) << 80) | (uuid7().int & ((1 << 80) - 1)))
    cases = {
        str(uuid.uuid4()): "is not a UUIDv7",
        "{" + str(uuid7()) + "}": "is not a UUIDv7",
        "not-an-id": "is not a UUIDv7",
        str(stale): "behind the coordinator's clock",
    }
    for request_id, words in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitTask(_request(request_id))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request_id
        assert words in (caught.value.details() or ""), caught.value.details()


async def test_a_key_and_a_request_id_together(stub: Stub, db: asyncpg.Connection) -> None:
    request_id = str(uuid7())
    first = await stub.SubmitTask(_request(request_id, idempotency_key="both"))
    again = await stub.SubmitTask(_request(request_id, idempotency_key="both"))
    assert first.task.id == again.task.id == request_id and again.deduplicated
    assert await _rows(db, [request_id]) == 1


async def test_an_upper_case_request_id_is_the_same_id(stub: Stub) -> None:
    request_id = str(uuid7())
    first = await stub.SubmitTask(_request(request_id.upper()))
    again = await stub.SubmitTask(_request(request_id))
    assert first.task.id == again.task.id == request_id and again.deduplicated
