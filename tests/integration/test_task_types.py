"""Task-type definitions: defaults for unset fields, cached on every coordinator, and a
change acknowledged only once every cache holds it (set on either coordinator, submitted
on the leader at once: never the replaced definition). Tenant isolation, bad input, and
a cache connection that does not take a change in time is ended."""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from coordinator_pair import coordinator_pair, known_everywhere
from google.protobuf import duration_pb2
from security import Key, Keys
from testsupport import eventually

from conveyor.coordinator import Coordinator
from conveyor.v1 import (
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    task_type_service_pb2,
    task_type_service_pb2_grpc,
)

TaskType = task_type_service_pb2.TaskType


@pytest.fixture
async def pair(database_dsn: str) -> AsyncIterator[tuple[Coordinator, Coordinator, str]]:
    async with coordinator_pair(database_dsn) as coordinators:
        yield coordinators


async def test_definitions_default_submits_everywhere_at_once(
    pair: tuple[Coordinator, Coordinator, str], database_dsn: str
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
        types_far = task_type_service_pb2_grpc.TaskTypeServiceStub(far)
        types_near = task_type_service_pb2_grpc.TaskTypeServiceStub(near)
        tasks = task_service_pb2_grpc.TaskServiceStub(near)

        async def set_type(stub: Any, key: Key, **fields: Any) -> TaskType:
            request = task_type_service_pb2.SetTaskTypeRequest(task_type=TaskType(**fields))
            reply = await stub.SetTaskType(request, metadata=key.metadata, timeout=10)
            defined: TaskType = reply.task_type
            return defined

        async def submit(key: Key, **fields: Any) -> task_pb2.Task:
            request = task_service_pb2.SubmitTaskRequest(type="mail", **fields)
            reply = await tasks.SubmitTask(request, metadata=key.metadata, timeout=10)
            return reply.task

        defined = await set_type(
            types_far, acme, type="mail", queue="email", max_attempts=5, priority=7,
            timeout=duration_pb2.Duration(seconds=30),
            retry_policy=task_pb2.RetryPolicy(
                initial_backoff=duration_pb2.Duration(seconds=2), multiplier=3.0, jitter=0.0
            ),
        )  # fmt: skip
        assert defined.version > 0
        task = await submit(acme, queue="default")  # what the SDKs send for "no queue"
        assert (task.queue, task.max_attempts, task.priority) == ("email", 5, 7)
        assert task.timeout.seconds == 30
        assert (task.retry_policy.initial_backoff.seconds, task.retry_policy.multiplier) == (2, 3)
        # What a submit sets wins; another tenant's submits are its own.
        task = await submit(acme, queue="urgent", max_attempts=2)
        assert (task.queue, task.max_attempts, task.priority) == ("urgent", 2, 7)
        task = await submit(other)
        assert (task.queue, task.max_attempts) == ("default", 3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await types_near.GetTaskType(
                task_type_service_pb2.GetTaskTypeRequest(type="mail"), metadata=other.metadata
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await types_near.ListTaskTypes(
            task_type_service_pb2.ListTaskTypesRequest(), metadata=other.metadata
        )
        assert list(listed.task_types) == []

        # A change acknowledged (on either coordinator) is what the next submit gets.
        for attempts in range(1, 21):
            stub = types_far if attempts % 2 else types_near
            await set_type(stub, acme, type="mail", queue="email", max_attempts=attempts)
            assert (await submit(acme)).max_attempts == attempts
        assert follower.task_types is not None and leader.task_types is not None
        delays = sorted([*follower.task_types.delays, *leader.task_types.delays])
        assert len(delays) >= 40 and delays[-1] < 1.0
        for _ in range(20):
            await submit(acme)
        hit_rate = leader.task_types.hit_rate
        assert hit_rate > 0.4
        print(  # the figures the report quotes (pytest -s)
            f"invalidation delay: median {statistics.median(delays) * 1000:.1f} ms, "
            f"max {delays[-1] * 1000:.1f} ms over {len(delays)} drops; "
            f"leader cache hit rate {hit_rate:.2f} "
            f"({leader.task_types.hits} hits, {leader.task_types.misses} misses)"
        )

        # Bad definitions are bad input.
        for fields in (
            {"type": ""},
            {"type": "mail", "queue": "bad queue"},
            {"type": "mail", "queue": ""},
            {"type": "mail", "max_attempts": 0},
            {"type": "mail", "max_attempts": 5000},
            {"type": "mail", "priority": 99999},
            {"type": "mail", "timeout": duration_pb2.Duration(seconds=-1)},
            {"type": "mail", "retry_policy": task_pb2.RetryPolicy(multiplier=0.5)},
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await set_type(types_near, acme, **fields)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields

        # A cache connection that does not take a change is ended, and the change answered.
        laggard = await asyncpg.connect(
            database_dsn, server_settings={"application_name": "conveyor-types v0"}
        )
        try:
            await set_type(types_near, acme, type="mail", max_attempts=4)
            await eventually(laggard.is_closed, timeout=5, what="the laggard's connection ended")
        finally:
            laggard.terminate()
        assert (await submit(acme)).max_attempts == 4

        await types_far.DeleteTaskType(
            task_type_service_pb2.DeleteTaskTypeRequest(type="mail"), metadata=acme.metadata
        )
        task = await submit(acme)
        assert (task.queue, task.max_attempts) == ("default", 3)
