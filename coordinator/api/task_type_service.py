"""``TaskTypeService``: a tenant's task-type definitions (the defaults of its submits).

A definition is checked as the submit it would make would be (``validate_submit`` on a
request carrying its fields), so a definition never makes a submit fail. A change is
answered once every coordinator's cache holds it (``lifecycle/task_types.py``).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api import context
from conveyor.coordinator.api.validation import check_name, validate_submit
from conveyor.coordinator.errors import FieldViolation, InvalidArgument, TaskTypeNotFound
from conveyor.coordinator.lifecycle.task_types import wait_for_caches
from conveyor.coordinator.store import task_types as store
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.store.task_types import Definition
from conveyor.v1 import task_service_pb2, task_type_service_pb2, task_type_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _message(row: asyncpg.Record) -> task_type_service_pb2.TaskType:
    message = task_type_service_pb2.TaskType(
        type=row["type"], version=row["version"], update_time=convert.timestamp(row["update_time"])
    )
    if row["queue"] is not None:
        message.queue = row["queue"]
    if row["priority"] is not None:
        message.priority = row["priority"]
    if row["max_attempts"] is not None:
        message.max_attempts = row["max_attempts"]
    if row["timeout_ms"] is not None:
        message.timeout.FromMilliseconds(row["timeout_ms"])
    if row["retry_initial_ms"] is not None:
        policy = message.retry_policy
        policy.initial_backoff.FromMilliseconds(row["retry_initial_ms"])
        policy.max_backoff.FromMilliseconds(row["retry_max_ms"])
        policy.multiplier = row["retry_multiplier"]
        policy.jitter = row["retry_jitter"]
    return message


def definition(
    tenant: str, message: task_type_service_pb2.TaskType, max_payload: int
) -> Definition:
    """The definition a SetTaskType asks for; INVALID_ARGUMENT naming each bad field."""
    request = task_service_pb2.SubmitTaskRequest(type=message.type)
    if message.HasField("queue"):
        request.queue = message.queue
    if message.HasField("priority"):
        request.priority = message.priority
    if message.HasField("max_attempts"):
        request.max_attempts = message.max_attempts
    if message.HasField("timeout"):
        request.timeout.CopyFrom(message.timeout)
    if message.HasField("retry_policy"):
        request.retry_policy.CopyFrom(message.retry_policy)
    task, violations = validate_submit(request, max_payload_bytes=max_payload, prefix="task_type.")
    out = list(violations)
    if message.HasField("queue") and not message.queue:
        out.append(FieldViolation("task_type.queue", "must not be empty when set"))
    if message.HasField("max_attempts") and message.max_attempts == 0:
        out.append(FieldViolation("task_type.max_attempts", "must be at least 1 when set"))
    if message.HasField("timeout") and task is not None and not task.timeout_ms:
        out.append(FieldViolation("task_type.timeout", "must be positive when set"))
    if out or task is None:
        raise InvalidArgument(out)
    retry = message.HasField("retry_policy")
    return Definition(
        tenant=tenant,
        type=message.type,
        queue=task.queue if message.HasField("queue") else None,
        priority=task.priority if message.HasField("priority") else None,
        max_attempts=task.max_attempts if message.HasField("max_attempts") else None,
        timeout_ms=task.timeout_ms if message.HasField("timeout") else None,
        retry_initial_ms=task.retry_initial_ms if retry else None,
        retry_max_ms=task.retry_max_ms if retry else None,
        retry_multiplier=task.retry_multiplier if retry else None,
        retry_jitter=task.retry_jitter if retry else None,
    )


def _type_name(value: str, field: str = "type") -> str:
    out: list[FieldViolation] = []
    check_name(value, field, out, required=True)
    if out:
        raise InvalidArgument(out)
    return value


class TaskTypeServicer(task_type_service_pb2_grpc.TaskTypeServiceServicer):
    def __init__(self, db: Database, *, max_payload_bytes: int) -> None:
        self._db = db
        self._max_payload = max_payload_bytes

    async def SetTaskType(
        self, request: task_type_service_pb2.SetTaskTypeRequest, context_: Context
    ) -> task_type_service_pb2.SetTaskTypeResponse:
        tenant = context.current().tenant
        d = definition(tenant, request.task_type, self._max_payload)
        async with self._db.autocommit() as conn:
            row = await store.upsert(conn, d)
        await wait_for_caches(self._db, row["version"])
        return task_type_service_pb2.SetTaskTypeResponse(task_type=_message(row))

    async def GetTaskType(
        self, request: task_type_service_pb2.GetTaskTypeRequest, context_: Context
    ) -> task_type_service_pb2.GetTaskTypeResponse:
        tenant = context.current().tenant
        async with self._db.read() as conn:
            row = await store.get(conn, tenant, _type_name(request.type))
        if row is None:
            raise TaskTypeNotFound(request.type)
        return task_type_service_pb2.GetTaskTypeResponse(task_type=_message(row))

    async def ListTaskTypes(
        self, request: task_type_service_pb2.ListTaskTypesRequest, context_: Context
    ) -> task_type_service_pb2.ListTaskTypesResponse:
        tenant = context.current().tenant
        async with self._db.read() as conn:
            rows = await store.list_for(conn, tenant)
        return task_type_service_pb2.ListTaskTypesResponse(task_types=[_message(r) for r in rows])

    async def DeleteTaskType(
        self, request: task_type_service_pb2.DeleteTaskTypeRequest, context_: Context
    ) -> task_type_service_pb2.DeleteTaskTypeResponse:
        tenant = context.current().tenant
        async with self._db.autocommit() as conn:
            version = await store.delete(conn, tenant, _type_name(request.type))
        if version is None:
            raise TaskTypeNotFound(request.type)
        await wait_for_caches(self._db, version)
        return task_type_service_pb2.DeleteTaskTypeResponse()
