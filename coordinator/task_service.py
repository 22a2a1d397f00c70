"""``TaskService``: the API applications use to submit, inspect, wait for and cancel tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
import grpc

from conveyor.coordinator import convert, validation
from conveyor.coordinator.config import DEFAULT_TENANT, CoordinatorConfig
from conveyor.coordinator.errors import (
    InvalidState,
    TaskNotFound,
)
from conveyor.coordinator.leader_rpc import leader_rpc
from conveyor.coordinator.schedule_service import ScheduleServiceMixin
from conveyor.coordinator.sessions import SessionRegistry
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.submissions import SubmitGroup, Submitter
from conveyor.coordinator.watchers import TaskWatchers
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.task_service")

# A watcher re-reads its task this often even without a wake-up, as a safety net.
WATCH_REFRESH = 2.0
_TERMINAL = {store.SUCCEEDED, store.DEAD, store.CANCELLED}


class TaskServicer(ScheduleServiceMixin, task_service_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        config: CoordinatorConfig,
        submitter: Submitter,
        sessions: SessionRegistry,
        watchers: TaskWatchers,
        *,
        fence: Callable[[], Fence],
        is_leader: Callable[[], bool],
        leader_address: Callable[[], str],
        on_ready: Callable[[str, str], None],
    ) -> None:
        self._pool = pool
        self._config = config
        self._submitter = submitter
        self._sessions = sessions
        self._watchers = watchers
        self._fence = fence
        self._is_leader = is_leader
        self._leader_address = leader_address
        self._on_ready = on_ready

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:  # type: ignore[type-arg]
        # Until API keys exist every caller is the default tenant.
        return DEFAULT_TENANT

    @leader_rpc
    async def SubmitTask(
        self,
        request: task_service_pb2.SubmitTaskRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.SubmitTaskResponse:
        task = validation.validate_submit_one(
            request, max_payload_bytes=self._config.max_payload_bytes
        )
        (result,) = await self._submitter.submit(SubmitGroup(self._tenant(context), [task]))
        return task_service_pb2.SubmitTaskResponse(
            task=result.task, deduplicated=result.deduplicated
        )

    @leader_rpc
    async def SubmitTasks(
        self,
        request: task_service_pb2.SubmitTasksRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.SubmitTasksResponse:
        tasks = validation.validate_submit_batch(
            request, max_payload_bytes=self._config.max_payload_bytes
        )
        results = await self._submitter.submit(SubmitGroup(self._tenant(context), tasks))
        response = task_service_pb2.SubmitTasksResponse()
        add = response.results.add
        for r in results:
            # Built in place: a SubmitTaskResponse made apart would be copied once more.
            add(task=r.task, deduplicated=r.deduplicated)
        return response

    @leader_rpc
    async def GetTask(
        self,
        request: task_service_pb2.GetTaskRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.GetTaskResponse:
        task_id = validation.validate_task_id(request.id)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            row = await store.get(conn, tenant, task_id)
            if row is None:
                raise TaskNotFound(request.id)
            attempts = await store.attempts(conn, tenant, task_id)
        return task_service_pb2.GetTaskResponse(
            task=convert.task_from_row(row),
            attempts=[convert.attempt_from_row(a) for a in attempts],
        )

    @leader_rpc
    async def ListTasks(
        self,
        request: task_service_pb2.ListTasksRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.ListTasksResponse:
        flt = validation.validate_list(request)
        async with self._pool.acquire() as conn:
            rows = await store.list_page(conn, self._tenant(context), flt)
        more = len(rows) > flt.page_size
        rows = rows[: flt.page_size]
        return task_service_pb2.ListTasksResponse(
            tasks=[convert.task_from_row(r) for r in rows],
            next_page_token=str(rows[-1]["id"]) if more else "",
        )

    @leader_rpc
    async def CancelTask(
        self,
        request: task_service_pb2.CancelTaskRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.CancelTaskResponse:
        task_id = validation.validate_task_id(request.id)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                previous = await store.cancel(conn, tenant, task_id)
            row = await store.get(conn, tenant, task_id)
        if row is None:
            raise TaskNotFound(request.id)
        if previous is None and row["state"] != store.CANCELLED:
            raise InvalidState(request.id, task_pb2.TaskState.Name(row["state"]), "cancel")
        if previous is not None:
            self._watchers.changed([task_id])
            if previous["state"] == store.RUNNING and previous["worker_id"]:
                await self._push_cancel(previous, request.id)
        return task_service_pb2.CancelTaskResponse(task=convert.task_from_row(row))

    async def _push_cancel(self, previous: asyncpg.Record, task_id: str) -> None:
        session = self._sessions.by_worker(previous["worker_id"])
        if session is None:
            return  # the worker is gone; its result will be refused when it returns
        await session.send(
            worker_service_pb2.ConnectResponse(
                cancel_tasks=worker_service_pb2.CancelTasks(
                    leases=[
                        worker_service_pb2.Lease(
                            task_id=task_id,
                            attempt=previous["attempt"],
                            epoch=previous["lease_epoch"],
                        )
                    ]
                )
            )
        )

    @leader_rpc
    async def RetryTask(
        self,
        request: task_service_pb2.RetryTaskRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.RetryTaskResponse:
        task_id = validation.validate_task_id(request.id)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                row = await store.redrive(conn, tenant, task_id)
            if row is None:
                current = await store.get(conn, tenant, task_id)
                if current is None:
                    raise TaskNotFound(request.id)
                raise InvalidState(request.id, task_pb2.TaskState.Name(current["state"]), "retry")
        self._watchers.changed([task_id])
        self._on_ready(tenant, row["queue"])
        return task_service_pb2.RetryTaskResponse(task=convert.task_from_row(row))

    @leader_rpc
    async def ListQueues(
        self,
        request: task_service_pb2.ListQueuesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> task_service_pb2.ListQueuesResponse:
        async with self._pool.acquire() as conn:
            rows = await store.queue_stats(conn, self._tenant(context))
        return task_service_pb2.ListQueuesResponse(
            queues=[
                task_pb2.QueueStats(
                    name=r["queue"],
                    pending=r["pending"],
                    scheduled=r["scheduled"],
                    running=r["running"],
                    dead=r["dead"],
                )
                for r in rows
            ]
        )

    @leader_rpc
    async def WatchTask(  # type: ignore[override]
        self,
        request: task_service_pb2.WatchTaskRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> None:
        task_id = validation.validate_task_id(request.id)
        tenant = self._tenant(context)
        with self._watchers.watch(task_id) as changed:
            sent: tuple[int, object] | None = None
            while True:
                changed.clear()
                async with self._pool.acquire() as conn:
                    row = await store.get(conn, tenant, task_id)
                if row is None:
                    raise TaskNotFound(request.id)
                version = (row["state"], row["update_time"])
                if version != sent:
                    sent = version
                    await context.write(
                        task_service_pb2.WatchTaskResponse(task=convert.task_from_row(row))
                    )
                if row["state"] in _TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), WATCH_REFRESH)
