"""``TaskService``: the API applications use to submit, inspect, wait for and cancel tasks.

Handlers only do their work: the interceptors (``api/interceptors/``) refuse calls on a
follower (all but submits and reads: ``interceptors/leader.py``), fill the request context
(the tenant is read from it) and turn whatever a handler raises into the right status.
The schedule methods are the
:class:`~conveyor.coordinator.schedule_service.ScheduleService`'s; this class only routes
them, so the wire API keeps schedules in TaskService.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api import context, pages, validation, watch_tasks
from conveyor.coordinator.api.queue_ops import QueueOps
from conveyor.coordinator.api.rate_limits import RateLimitService
from conveyor.coordinator.api.schedule_service import ScheduleService
from conveyor.coordinator.api.workers import worker_infos
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch import policy as dispatch_policy
from conveyor.coordinator.dispatch.breakers import Breakers
from conveyor.coordinator.errors import EtagMismatch, InvalidState, TaskNotFound
from conveyor.coordinator.lifecycle.submits import SubmitGroup, Submitter
from conveyor.coordinator.lifecycle.task_events import TaskEventHub
from conveyor.coordinator.lifecycle.task_types import TaskTypes
from conveyor.coordinator.lifecycle.transitions import Cause
from conveyor.coordinator.store import dependencies
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Fence
from conveyor.coordinator.tenancy import keys
from conveyor.coordinator.tenancy.quotas import Quotas
from conveyor.transport._encryption import ENCRYPTED_CONTENT_TYPE, envelope_key_id
from conveyor.v1 import (
    schedule_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    watch_pb2,
)

_WAITING = frozenset({store.PENDING, store.SCHEDULED})
Context = grpc.aio.ServicerContext[Any, Any]
TaskWrite = Callable[
    [asyncpg.Connection, str, uuid.UUID, Fence], Awaitable[Sequence[asyncpg.Record]]
]
"""A fenced write of one task (``store.tasks.cancel``, ``redrive``): its transition (none
when it changed nothing), then those of the dependents it moved."""


class TaskServicer(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        deps: Deps,
        submitter: Submitter,
        schedules: ScheduleService,
        *,
        quotas: Quotas,
        queue_ops: QueueOps,
        rate_limits: RateLimitService,
        breakers: Breakers,
        events: TaskEventHub | None = None,
        task_types: TaskTypes | None = None,
    ) -> None:
        self._deps = deps
        self._events = events
        self._task_types = task_types
        self._submitter = submitter
        self._schedules = schedules
        self._quotas = quotas
        self._queue_ops = queue_ops
        self._rate_limits = rate_limits
        self._breakers = breakers

    # -- submits -----------------------------------------------------------------------------

    async def SubmitTask(
        self, request: task_service_pb2.SubmitTaskRequest, context_: Context
    ) -> task_service_pb2.SubmitTaskResponse:
        tenant = context.current().tenant
        async with self._quotas.admission(tenant, [request]):
            if self._task_types is not None:
                await self._task_types.apply(tenant, [request])
            task = validation.validate_submit_one(
                request, max_payload_bytes=self._deps.config.max_payload_bytes
            )
            group = SubmitGroup(tenant, [task], has_dependencies=bool(task.after))
            (result,) = await self._submitter.submit(group)
        return task_service_pb2.SubmitTaskResponse(
            task=result.task, deduplicated=result.deduplicated
        )

    async def SubmitTasks(
        self, request: task_service_pb2.SubmitTasksRequest, context_: Context
    ) -> task_service_pb2.SubmitTasksResponse:
        tenant = context.current().tenant
        async with self._quotas.admission(tenant, request.tasks):
            if self._task_types is not None:
                await self._task_types.apply(tenant, request.tasks)
            tasks = await validation.validate_submit_batch(
                request, max_payload_bytes=self._deps.config.max_payload_bytes
            )
            deps = any(t.after or t.after_refs for t in tasks)
            results = await self._submitter.submit(SubmitGroup(tenant, tasks, deps))
        # Parsed from the answers' encodings (most of a batch's share one, see
        # Submitted.entry): far cheaper than a Task message built per task.
        return task_service_pb2.SubmitTasksResponse.FromString(b"".join(r.entry() for r in results))

    # -- reads -------------------------------------------------------------------------------

    def _unserved(self, row: asyncpg.Record) -> tuple[bool, str]:
        """Whether the task waits and no connected worker takes its queue and type or,
        taking them, holds its encryption key; and that key id when it is the reason.
        Only the leader knows: workers connect to it, so a follower (serving reads too)
        never calls a task unserved."""
        if row["state"] not in _WAITING or not self._deps.office.leader:
            return False, ""
        key = (
            envelope_key_id(row["payload"])
            if row["content_type"] == ENCRYPTED_CONTENT_TYPE
            else None
        )
        return dispatch_policy.unserved(
            self._deps.sessions, row["tenant"], row["queue"], row["type"], key
        )

    async def GetTask(
        self, request: task_service_pb2.GetTaskRequest, context_: Context
    ) -> task_service_pb2.GetTaskResponse:
        task_id = validation.validate_task_id(request.id)
        tenant = context.current().tenant
        async with self._deps.db.read() as conn:
            row = await store.get(conn, tenant, task_id)
            if row is None:
                raise TaskNotFound(request.id)
            attempts = await store.attempts(conn, tenant, task_id)
            waiting_for = (
                await dependencies.waiting_for(conn, tenant, str(task_id))
                if row["state"] == store.BLOCKED
                else []
            )
        unserved, missing_key = self._unserved(row)
        return task_service_pb2.GetTaskResponse(
            task=convert.task_from_row(row),
            attempts=[convert.attempt_from_row(a) for a in attempts],
            unserved=unserved,
            unserved_encryption_key=missing_key,
            waiting_for=waiting_for,
        )

    async def ListTasks(
        self, request: task_service_pb2.ListTasksRequest, context_: Context
    ) -> task_service_pb2.ListTasksResponse:
        flt = validation.validate_list(request)
        async with self._deps.db.read() as conn:
            rows = await store.list_page(conn, context.current().tenant, flt)
        rows, token = pages.page(rows, flt.page_size, lambda last: str(last["id"]))
        return task_service_pb2.ListTasksResponse(
            tasks=[convert.task_from_row(r) for r in rows], next_page_token=token
        )

    async def ListQueues(
        self, request: task_service_pb2.ListQueuesRequest, context_: Context
    ) -> task_service_pb2.ListQueuesResponse:
        return await self._queue_ops.list_queues(request, self._rate_limits, self._breakers)

    # -- rate limits (api/rate_limits.py) ------------------------------------------------------

    async def SetRateLimit(
        self, request: task_service_pb2.SetRateLimitRequest, context_: Context
    ) -> task_service_pb2.SetRateLimitResponse:
        return await self._rate_limits.set_limit(request)

    async def ListRateLimits(
        self, request: task_service_pb2.ListRateLimitsRequest, context_: Context
    ) -> task_service_pb2.ListRateLimitsResponse:
        return await self._rate_limits.list_limits()

    async def DeleteRateLimit(
        self, request: task_service_pb2.DeleteRateLimitRequest, context_: Context
    ) -> task_service_pb2.DeleteRateLimitResponse:
        return await self._rate_limits.delete_limit(request)

    async def ListWorkers(
        self, request: task_service_pb2.ListWorkersRequest, context_: Context
    ) -> task_service_pb2.ListWorkersResponse:
        call = context.current()
        # An admin key acts for every tenant; with authentication off there are no keys
        # and so no tenants to keep apart.
        everyone = keys.ADMIN in call.scopes or not call.key_id
        return task_service_pb2.ListWorkersResponse(
            workers=await worker_infos(
                self._deps.sessions, self._deps.db, None if everyone else call.tenant
            )
        )

    async def WatchTask(  # type: ignore[override]
        self, request: task_service_pb2.WatchTaskRequest, context_: Context
    ) -> None:
        task_id = validation.validate_task_id(request.id)
        tenant = context.current().tenant
        # The rows come from the coordinator's one watch reader (watchers.py), never from
        # a read of this stream's own.
        with self._deps.watchers.watch(tenant, task_id) as watch:
            sent: tuple[object, ...] | None = None
            while True:
                row = await watch.next()
                unserved, missing_key = self._unserved(row)
                version = (row["state"], row["update_time"], unserved, missing_key)
                if version != sent:
                    sent = version
                    await context_.write(
                        task_service_pb2.WatchTaskResponse(
                            task=convert.task_from_row(row),
                            unserved=unserved,
                            unserved_encryption_key=missing_key,
                        )
                    )
                if row["state"] in store.TERMINAL:
                    return

    async def WatchTasks(  # type: ignore[override]
        self, request: watch_pb2.WatchTasksRequest, context_: Context
    ) -> None:
        if self._events is None:
            raise RuntimeError("WatchTasks needs the coordinator's TaskEventHub")
        await watch_tasks.serve(self._events, request, context_)

    # -- transitions -------------------------------------------------------------------------

    async def CancelTask(
        self, request: task_service_pb2.CancelTaskRequest, context_: Context
    ) -> task_service_pb2.CancelTaskResponse:
        row = await self._transition(
            request.id, "cancel", store.cancel, Cause.CANCELLED, done=store.CANCELLED
        )
        return task_service_pb2.CancelTaskResponse(task=convert.task_from_row(row))

    async def RetryTask(
        self, request: task_service_pb2.RetryTaskRequest, context_: Context
    ) -> task_service_pb2.RetryTaskResponse:
        row = await self._transition(request.id, "retry", store.redrive, Cause.REDRIVEN)
        return task_service_pb2.RetryTaskResponse(task=convert.task_from_row(row))

    async def _transition(
        self, request_id: str, action: str, write: TaskWrite, cause: Cause, *, done: int = -1
    ) -> asyncpg.Record:
        """One task's fenced transition, then the task as it is after it (read in the same
        transaction): NOT_FOUND when there is no such task, INVALID_STATE when the write
        changed nothing, unless the task is in ``done`` already (a repeated cancel)."""
        task_id = validation.validate_task_id(request_id)
        tenant = context.current().tenant
        async with self._deps.db.write() as conn:
            changed = await write(conn, tenant, task_id, self._deps.office.fence())
            row = await store.get(conn, tenant, task_id)
        if row is None:
            raise TaskNotFound(request_id)
        if not changed and row["state"] != done:
            raise InvalidState(request_id, task_pb2.TaskState.Name(row["state"]), action)
        self._deps.after_commit.publish(cause, changed)
        return row

    async def UpdateTask(
        self, request: task_service_pb2.UpdateTaskRequest, context_: Context
    ) -> task_service_pb2.UpdateTaskResponse:
        update = validation.validate_update(request)
        tenant = context.current().tenant
        async with self._deps.db.write() as conn:
            current = await store.lock_for_update(conn, tenant, update.task_id)
            if current is None:
                raise TaskNotFound(request.id)
            etag = convert.task_etag(current["version"])
            if update.etag and update.etag != etag:
                raise EtagMismatch(f"task {request.id}", update.etag, etag)
            if not store.waiting_unstarted(current):
                state = task_pb2.TaskState.Name(current["state"])
                raise InvalidState(request.id, state, "update started")
            changed = await store.update_waiting(
                conn,
                tenant,
                update.task_id,
                version=current["version"],
                priority=update.priority,
                max_attempts=update.max_attempts,
                labels=update.labels,
                run_at=update.run_at,
                fence=self._deps.office.fence(),
            )
            row = await store.get(conn, tenant, update.task_id)
        assert row is not None  # locked above: nothing deleted it
        if changed is not None:
            self._deps.after_commit.publish(Cause.UPDATED, [changed])
        return task_service_pb2.UpdateTaskResponse(task=convert.task_from_row(row))

    # -- schedules (ScheduleService's) -------------------------------------------------------

    async def CreateSchedule(
        self, request: schedule_pb2.CreateScheduleRequest, context_: Context
    ) -> schedule_pb2.CreateScheduleResponse:
        return await self._schedules.create(request)

    async def GetSchedule(
        self, request: schedule_pb2.GetScheduleRequest, context_: Context
    ) -> schedule_pb2.GetScheduleResponse:
        return await self._schedules.get(request)

    async def ListSchedules(
        self, request: schedule_pb2.ListSchedulesRequest, context_: Context
    ) -> schedule_pb2.ListSchedulesResponse:
        return await self._schedules.list_page(request)

    async def UpdateSchedule(
        self, request: schedule_pb2.UpdateScheduleRequest, context_: Context
    ) -> schedule_pb2.UpdateScheduleResponse:
        return await self._schedules.update(request)

    async def DeleteSchedule(
        self, request: schedule_pb2.DeleteScheduleRequest, context_: Context
    ) -> schedule_pb2.DeleteScheduleResponse:
        return await self._schedules.delete(request)

    async def PauseSchedule(
        self, request: schedule_pb2.PauseScheduleRequest, context_: Context
    ) -> schedule_pb2.PauseScheduleResponse:
        return await self._schedules.pause(request)

    async def ResumeSchedule(
        self, request: schedule_pb2.ResumeScheduleRequest, context_: Context
    ) -> schedule_pb2.ResumeScheduleResponse:
        return await self._schedules.resume(request)

    # -- queue operations (QueueOps') --------------------------------------------------------

    async def PauseQueue(
        self, request: task_service_pb2.PauseQueueRequest, context_: Context
    ) -> task_service_pb2.PauseQueueResponse:
        return await self._queue_ops.pause(request)

    async def ResumeQueue(
        self, request: task_service_pb2.ResumeQueueRequest, context_: Context
    ) -> task_service_pb2.ResumeQueueResponse:
        return await self._queue_ops.resume(request)

    async def ListDeadTasks(
        self, request: task_service_pb2.ListDeadTasksRequest, context_: Context
    ) -> task_service_pb2.ListDeadTasksResponse:
        return await self._queue_ops.list_dead(request)

    async def ListDeadTaskGroups(
        self, request: task_service_pb2.ListDeadTaskGroupsRequest, context_: Context
    ) -> task_service_pb2.ListDeadTaskGroupsResponse:
        return await self._queue_ops.dead_groups(request)

    async def RetryTasks(
        self, request: task_service_pb2.RetryTasksRequest, context_: Context
    ) -> task_service_pb2.RetryTasksResponse:
        return await self._queue_ops.retry_many(request)

    async def DeleteTasks(
        self, request: task_service_pb2.DeleteTasksRequest, context_: Context
    ) -> task_service_pb2.DeleteTasksResponse:
        return await self._queue_ops.delete_many(request)
