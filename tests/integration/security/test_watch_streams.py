"""WatchTask streams cannot be a cheap denial of service (issue 15's suspicion, decided).

Before: streams per key were unlimited, and each one read its task from PostgreSQL every
2 s on its own, so a few hundred idle streams of one key kept the database busier than the
whole queue. Now every watcher of a coordinator is served from one shared read per change
and per refresh, and each tenant may hold at most ``max_watch_streams`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from security import Keys
from testsupport import coordinator_config, error_details, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.lifecycle.watchers import WATCH_REFRESH
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

Stream = grpc.aio.UnaryStreamCall[
    task_service_pb2.WatchTaskRequest, task_service_pb2.WatchTaskResponse
]


async def _watch(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    task_id: str,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Stream:
    """A WatchTask stream whose first answer (the task as it is) was read."""
    stream = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task_id), metadata=metadata)
    first = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(first, task_service_pb2.WatchTaskResponse) and first.task.id == task_id
    return stream


async def _rest(stream: Stream) -> list[task_service_pb2.WatchTaskResponse]:
    """The answers left on a stream, until the coordinator ends it."""
    rest = []
    while (answer := await asyncio.wait_for(stream.read(), 10)) is not grpc.aio.EOF:
        assert isinstance(answer, task_service_pb2.WatchTaskResponse)
        rest.append(answer)
    return rest


@contextlib.asynccontextmanager
async def _counting_reads(coordinator: Coordinator) -> AsyncIterator[Callable[[], int]]:
    """Counts the coordinator's pooled database reads (every read, WatchTask's included,
    goes through ``Database.read``); the real reads still run."""
    assert coordinator.deps is not None
    db = coordinator.deps.db
    original = db.read
    count = 0

    def read() -> Any:
        nonlocal count
        count += 1
        return original()

    db.read = read  # type: ignore[method-assign]
    try:
        yield lambda: count
    finally:
        db.read = original  # type: ignore[method-assign]


async def test_watchers_share_their_reads_of_postgresql(database_dsn: str) -> None:
    watchers = 100
    # The background services read on timers of their own; slow them down so the count
    # is the watchers'.
    config = coordinator_config(database_dsn, reaper_interval=30.0, poll_interval=30.0)
    coordinator = Coordinator(config)
    await coordinator.start()
    streams: list[Stream] = []
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            task = await submit(stub, "nobody-serves-this")
            streams = [await _watch(stub, task.id) for _ in range(watchers)]
            async with _counting_reads(coordinator) as reads:
                # Two refresh intervals: each stream re-read its task twice on its own.
                await asyncio.sleep(2 * WATCH_REFRESH)
                idle = reads()
                await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
                for stream in streams:
                    rest = await _rest(stream)
                    assert [r.task.state for r in rest] == [task_pb2.TASK_STATE_CANCELLED]
                changed = reads() - idle
            # The background services' own reads are about 10 in that time.
            assert idle <= 30, f"{idle} reads in {2 * WATCH_REFRESH:g}s for {watchers} watchers"
            assert changed <= 10, f"{changed} reads for one change seen by {watchers} watchers"
    finally:
        for stream in streams:
            stream.cancel()
        await coordinator.stop(grace=1.0)


async def test_each_tenant_may_hold_max_watch_streams(database_dsn: str) -> None:
    _, admin_key = api_keys.generate()
    config = coordinator_config(
        database_dsn, authentication=True, bootstrap_key=admin_key, max_watch_streams=3
    )
    coordinator = Coordinator(config)
    await coordinator.start()
    streams: list[Stream] = []
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            keys = Keys(channel, admin_key)
            acme, other = (
                await keys.create("acme", "submit", "read"),
                await keys.create("globex", "submit", "read"),
            )
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            tasks = {}
            for key in (acme, other):
                request = task_service_pb2.SubmitTaskRequest(type="nobody-serves-this")
                tasks[key.tenant] = (await stub.SubmitTask(request, metadata=key.metadata)).task
            acme_task = tasks["acme"].id
            streams = [await _watch(stub, acme_task, acme.metadata) for _ in range(3)]

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _watch(stub, acme_task, acme.metadata)
            refused = error_details(caught.value)
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "QUOTA_EXCEEDED",
            )
            assert refused.quota_subjects == ["watch_streams"]
            assert "3 WatchTask streams open" in refused.message
            assert refused.retry_after is not None

            # Another tenant is not held back by it; a stream that ends frees its place.
            streams.append(await _watch(stub, tasks["globex"].id, other.metadata))
            streams.pop(0).cancel()

            async def admitted() -> Stream | None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    return await _watch(stub, acme_task, acme.metadata)
                return None

            streams.append(await eventually(admitted, what="a place freed by a closed stream"))
    finally:
        for stream in streams:
            stream.cancel()
        await coordinator.stop(grace=1.0)


@pytest.mark.parametrize("watchers", [1, 3])
async def test_a_watcher_sees_every_state_and_a_missing_task_is_not_found(
    database_dsn: str, watchers: int
) -> None:
    """The shared reads keep WatchTask's contract: each watcher sees the states in order
    until a terminal one; a task that does not exist is NOT_FOUND, for every watcher."""
    coordinator = Coordinator(coordinator_config(database_dsn))
    await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            missing = "01890000-0000-7000-8000-000000000000"
            for _ in range(watchers):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _watch(stub, missing)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            task = await submit(stub, "nobody-serves-this")
            streams = [await _watch(stub, task.id) for _ in range(watchers)]
            await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
            for stream in streams:
                states = [r.task.state for r in await _rest(stream)]
                assert states == [task_pb2.TASK_STATE_CANCELLED]
    finally:
        await coordinator.stop(grace=1.0)
