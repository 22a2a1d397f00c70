"""Fencing: once another coordinator takes a newer epoch, the old one writes nothing."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import grpc
import pytest
from testsupport import RawWorker, coordinator_config, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, worker_service_pb2


async def test_old_leader_is_fenced_off(
    coordinator: Coordinator,
    database_dsn: str,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    db: asyncpg.Connection,
) -> None:
    task = await submit(stub)
    worker = raw_workers()
    await worker.connect("w", credits=1)
    (assignment,) = await worker.assignments(1)

    successor = Coordinator(coordinator_config(database_dsn))
    await successor.start()
    try:
        assert successor.epoch == coordinator.epoch + 1
        # The old coordinator tries to apply a result: its own fence refuses the write.
        await worker.send(results=_one_result(assignment.lease))
        await eventually(_not_leader(coordinator))
        row = await db.fetchrow("SELECT state, result FROM tasks WHERE id = $1::uuid", task.id)
        assert row["state"] == task_pb2.TASK_STATE_RUNNING
        assert await db.fetchval("SELECT count(*) FROM task_attempts") == 0
        # And it sends clients elsewhere for what is the leader's; reads it still serves.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
        assert got.task.state == task_pb2.TASK_STATE_RUNNING
    finally:
        await successor.stop(grace=1.0)


def _one_result(lease: worker_service_pb2.Lease) -> worker_service_pb2.Results:
    return worker_service_pb2.Results(
        results=[
            worker_service_pb2.TaskResult(
                lease=lease,
                outcome=worker_service_pb2.TASK_OUTCOME_SUCCEEDED,
                result=b'"late"',
            )
        ]
    )


def _not_leader(coordinator: Coordinator) -> Callable[[], object]:
    async def check() -> bool:
        return not coordinator.leader

    return check
