"""The hand-off of fresh submits to waiting workers (``Dispatcher.hand_off``): a flush of
many queued submits is leased in its insert's own commit, each worker's share in one
message, and a share too large for one message is split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import pytest
from testsupport import RawWorker, submit

from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
Workers = Callable[[], RawWorker]
RUNNING = task_pb2.TASK_STATE_RUNNING


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    """No poll: a poll round holds a worker's credit while its claim runs, and a submit
    meeting it would not be handed off. Nothing else wakes the dispatcher in these tests
    once the worker's first claim came back short."""
    return {"poll_interval": 3600.0}


async def _starving(stub: Stub, raw_workers: Workers, queue: str, credits: int) -> RawWorker:
    """A worker of its own queue whose last claim came back short (one task for many
    credits): nothing waits for it, so the next fresh submit is handed to it. The task
    is finished at once: the raw worker's heartbeats renew nothing, and a lease that
    expired would come back and be claimed again."""
    await submit(stub, "echo", queue=queue)
    worker = raw_workers()
    await worker.connect(credits=credits, types=("echo",), queues=(queue,))
    (first,) = await worker.assignments(1)
    assert (await worker.report(first.lease)).accepted
    return worker


def _batch(queue: str, payload: bytes, count: int) -> task_service_pb2.SubmitTasksRequest:
    task = task_service_pb2.SubmitTaskRequest(type="echo", queue=queue, payload=payload)
    return task_service_pb2.SubmitTasksRequest(tasks=[task] * count)


async def test_a_flush_of_forty_is_handed_off_in_one_message(
    stub: Stub, raw_workers: Workers
) -> None:
    """Forty at once, as the lone submits queued behind a stalled commit flush together:
    more than the 16 a hand-off took before, when they went the batched way (an insert,
    then a claim: a second commit)."""
    worker = await _starving(stub, raw_workers, "forty", credits=50)
    answer = await stub.SubmitTasks(_batch("forty", b"{}", 40))
    assert [r.task.state for r in answer.results] == [RUNNING] * 40  # leased at once
    message = await worker.receive_kind("assignments", 10.0)
    assert [a.lease.task_id for a in message.assignments] == [r.task.id for r in answer.results]


async def test_a_share_too_large_for_one_message_is_split(stub: Stub, raw_workers: Workers) -> None:
    """Ten 1 MiB tasks handed to one worker: one message would pass gRPC's default 4 MiB
    limit (the raw worker keeps it) and end the stream."""
    worker = await _starving(stub, raw_workers, "large", credits=20)
    payload = b"x" * (1 << 20)
    answer = await stub.SubmitTasks(_batch("large", payload, 10))
    assert [r.task.state for r in answer.results] == [RUNNING] * 10
    got = await worker.assignments(10, timeout=30)
    assert [a.lease.task_id for a in got] == [r.task.id for r in answer.results]
    assert all(len(a.payload) == len(payload) for a in got)
