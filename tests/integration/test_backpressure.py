"""Backpressure end to end: a per-queue backlog limit (``max_queue_backlog``) under a
burst of ten times the limit, checked against what the database holds: every submit the
coordinator acknowledged is there and completes, every other one was told
RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, ``max_queue_backlog``, RetryInfo), nothing else was
written; and the client, which waits out RetryInfo for submits by default, gets a whole
burst through while a worker works the queue off."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import grpc
import pytest
from testsupport import error_details, eventually

from conveyor.client import AsyncClient
from conveyor.coordinator import Coordinator
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor.worker import TaskContext, Worker

LIMIT = 20
BURST = 10 * LIMIT


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    return {"max_queue_backlog": LIMIT, "backlog_refresh": 0.2, "poll_interval": 0.2}


async def _ids_in(db: asyncpg.Connection, queue: str) -> dict[str, int]:
    rows = await db.fetch("SELECT id::text, state FROM tasks WHERE queue = $1", queue)
    return {r["id"]: r["state"] for r in rows}


async def test_a_burst_of_ten_times_the_queue_limit(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
) -> None:
    async def one(i: int) -> str | grpc.aio.AioRpcError:
        request = task_service_pb2.SubmitTaskRequest(type="echo", queue="burst", payload=b"1")
        try:
            return (await stub.SubmitTask(request)).task.id
        except grpc.aio.AioRpcError as err:
            return err

    # Raw calls, no client retries: each is either acknowledged or refused.
    told = await asyncio.gather(*(one(i) for i in range(BURST)))
    acked = {t for t in told if isinstance(t, str)}
    refused = [t for t in told if not isinstance(t, str)]
    assert 0 < len(acked) <= LIMIT and len(acked) + len(refused) == BURST
    for err in refused:
        details = error_details(err)
        assert (details.code, details.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUOTA_EXCEEDED",
        ), details
        assert details.quota_subjects == ["max_queue_backlog"]
        assert details.retry_after is not None and details.retry_after > 0
    # What the database holds is exactly what was acknowledged: nothing dropped, nothing
    # written for a refusal.
    assert set(await _ids_in(db, "burst")) == acked
    # Another queue of the tenant has its own room.
    other = await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo", queue="q2"))
    assert other.task.id

    # The client waits RetryInfo out by default: a burst of ten times the limit, submitted
    # at once while a worker works the queue off, is all acknowledged, and all completes.
    worker = Worker(coordinator.address, queues=("burst",), concurrency=LIMIT)

    @worker.task("echo")
    async def echo(ctx: TaskContext, payload: Any) -> Any:
        return payload

    run = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        async with AsyncClient(coordinator.address, timeout=60) as client:
            tasks = await asyncio.gather(
                *(client.submit("echo", i, queue="burst") for i in range(BURST))
            )
        second = {t.id for t in tasks}
        assert len(second) == BURST

        async def all_done() -> bool:
            states = await _ids_in(db, "burst")
            return set(states) == acked | second and set(states.values()) == {
                task_pb2.TASK_STATE_SUCCEEDED
            }

        await eventually(
            all_done, timeout=60, interval=0.2, what="every acknowledged task to succeed"
        )
    finally:
        worker.shutdown(force=True)
        with contextlib.suppress(BaseException):
            await run
