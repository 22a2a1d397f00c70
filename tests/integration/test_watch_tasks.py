"""WatchTasks: many tasks' changes, filtered, on the leader and on a follower (the
changes reach it through PostgreSQL LISTEN/NOTIFY), tenant-isolated, with a bound on
what a stream may have waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from coordinator_pair import coordinator_pair, known_everywhere
from security import Key, Keys
from testsupport import eventually

from conveyor.coordinator import Coordinator
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, watch_pb2

PENDING = task_pb2.TASK_STATE_PENDING
CANCELLED = task_pb2.TASK_STATE_CANCELLED
BUFFER = 50


@pytest.fixture
async def pair(database_dsn: str) -> AsyncIterator[tuple[Coordinator, Coordinator, str]]:
    async with coordinator_pair(database_dsn, max_watch_buffer=BUFFER) as coordinators:
        yield coordinators


async def _open(stub: task_service_pb2_grpc.TaskServiceAsyncStub, key: Key, **fields: Any) -> Any:
    call = stub.WatchTasks(watch_pb2.WatchTasksRequest(**fields), metadata=key.metadata)
    first: Any = await asyncio.wait_for(call.read(), 10)
    assert list(first.events) == []  # open: changes from here on are sent
    return call


async def _read(call: Any, count: int) -> list[watch_pb2.TaskEvent]:
    events: list[watch_pb2.TaskEvent] = []
    while len(events) < count:
        events += (await asyncio.wait_for(call.read(), 10)).events
    return events


async def test_watch_tasks_on_leader_and_follower(
    pair: tuple[Coordinator, Coordinator, str],
) -> None:
    follower, leader, admin_key = pair
    async with (
        grpc.aio.insecure_channel(follower.address) as far,
        grpc.aio.insecure_channel(leader.address) as near,
    ):
        keys = Keys(near, admin_key)
        acme = await keys.create("acme", "submit", "read", "operate")
        other = await keys.create("other", "submit", "read", "operate")
        await known_everywhere((follower, leader), acme.id, other.id)
        on_follower = task_service_pb2_grpc.TaskServiceStub(far)
        on_leader = task_service_pb2_grpc.TaskServiceStub(near)

        # Bad filters are bad input.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _open(on_follower, acme, states=[99], queues=["bad queue"])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        by_queue = await _open(on_follower, acme, queues=["q1"], states=[PENDING, CANCELLED])
        by_label = await _open(on_leader, acme, labels={"env": "prod"})
        theirs = await _open(on_follower, other)
        slow = await _open(on_follower, acme, queues=["bulk"])
        assert leader.events is not None
        await eventually(
            lambda: (
                leader.events is not None
                and leader.events.watched("acme")
                and leader.events.watched("other")
            ),
            timeout=10,
            what="the leader to hear of the follower's streams",
        )

        async def submit(key: Key, queue: str, count: int, **labels: str) -> list[str]:
            request = task_service_pb2.SubmitTasksRequest(
                tasks=[
                    task_service_pb2.SubmitTaskRequest(queue=queue, type="t", labels=labels)
                    for _ in range(count)
                ]
            )
            reply = await on_leader.SubmitTasks(request, metadata=key.metadata, timeout=10)
            return [r.task.id for r in reply.results]

        q1 = await submit(acme, "q1", 3)
        await submit(acme, "q2", 1)
        (labelled,) = await submit(acme, "q2", 1, env="prod")
        (their_task,) = await submit(other, "q1", 1)
        await submit(acme, "bulk", BUFFER + 1)  # more than the slow stream may hold
        await on_leader.CancelTask(
            task_service_pb2.CancelTaskRequest(id=q1[0]), metadata=acme.metadata, timeout=10
        )

        seen = [(e.task_id, e.state) for e in await _read(by_queue, 4)]
        assert sorted(seen) == sorted([(t, PENDING) for t in q1] + [(q1[0], CANCELLED)])
        (event,) = await _read(by_label, 1)
        assert (event.task_id, event.state, event.from_state, event.queue) == (
            labelled,
            PENDING,
            task_pb2.TASK_STATE_UNSPECIFIED,
            "q2",
        )
        (event,) = await _read(theirs, 1)
        assert event.task_id == their_task  # nothing of acme's

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read(slow, BUFFER + 1)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "WatchTasks stream was ended" in (caught.value.details() or "")

        # Nothing else arrived on the filtered streams (another tenant's task, other queues).
        await on_leader.CancelTask(
            task_service_pb2.CancelTaskRequest(id=q1[1]), metadata=acme.metadata, timeout=10
        )
        (event,) = await _read(by_queue, 1)
        assert (event.task_id, event.state) == (q1[1], CANCELLED)
        for call in (by_queue, by_label, theirs):
            call.cancel()
