"""Reads straight from the API's messages, for what the client library's models lack.

The CLI shows fields the client models do not carry yet (``GetTaskResponse.unserved``,
``Task.uncounted_attempts``, ``QueueStats.workers``, the attempt outcomes NOT_STARTED and
INTERRUPTED) and the AdminService, which the client does not wrap. These reads go to the
first coordinator that answers: every coordinator serves reads, so there is no leader to
follow. Failures are raised as :class:`RemoteError`, which the CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from conveyor.cli import security
from conveyor.cli.app import Globals
from conveyor.cli.errors import RemoteError, RPCFailure, failure_from_grpc
from conveyor.client import Task
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)

T = TypeVar("T")


async def call(g: Globals, method: Callable[[grpc.aio.Channel, float], Awaitable[T]]) -> T:
    """Runs ``method(channel, timeout)`` on the first coordinator that can answer."""
    last: RPCFailure | None = None
    for address in g.addresses:
        async with g.channel(address) as channel:
            try:
                return await method(channel, g.rpc_timeout)
            except grpc.aio.AioRpcError as err:
                last = failure_from_grpc(err, address)
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    break  # an answer, not an absence: another replica would say the same
    assert last is not None, "no coordinator address to call"
    raise RemoteError(last)


def run(g: Globals, method: Any) -> Any:
    """:func:`call` from synchronous code."""
    return asyncio.run(call(g, method))


def _tasks(channel: grpc.aio.Channel) -> Any:
    return task_service_pb2_grpc.TaskServiceStub(channel)


def outcome_name(value: int) -> str:
    """``not started`` for ATTEMPT_OUTCOME_NOT_STARTED (proto names, so new ones show)."""
    try:
        name = task_pb2.AttemptOutcome.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"outcome {value}"
    return name.removeprefix("ATTEMPT_OUTCOME_").lower().replace("_", " ")


@dataclass(frozen=True)
class TaskView:
    """A task as the CLI shows it: the client model plus the fields it lacks."""

    task: Task
    uncounted_attempts: int
    #: No connected worker takes this waiting task's type from its queue (or holds its key).
    unserved: bool
    attempts: tuple[task_pb2.TaskAttempt, ...] = ()
    #: The encryption key no connected worker that takes the task holds, when that is why.
    unserved_encryption_key: str = ""


def get_task(g: Globals, task_id: str) -> TaskView:
    async def method(channel: grpc.aio.Channel, seconds: float) -> TaskView:
        response = await _tasks(channel).GetTask(
            task_service_pb2.GetTaskRequest(id=task_id), timeout=seconds
        )
        return TaskView(
            security.open_task(g, Task.from_proto(response.task)),
            response.task.uncounted_attempts,
            response.unserved,
            tuple(response.attempts),
            response.unserved_encryption_key,
        )

    result: TaskView = run(g, method)
    return result


async def task_unserved(
    channel: grpc.aio.Channel, task_id: str, seconds: float
) -> tuple[bool, str]:
    """Whether the task waits with no connected worker for it (one GetTask), and the
    encryption key none of them holds when that is why."""
    response = await _tasks(channel).GetTask(
        task_service_pb2.GetTaskRequest(id=task_id), timeout=seconds
    )
    return bool(response.unserved), response.unserved_encryption_key


def list_tasks(
    g: Globals,
    *,
    queue: str | None,
    state: int,
    type: str | None,
    page_size: int,
) -> list[TaskView]:
    async def method(channel: grpc.aio.Channel, seconds: float) -> list[TaskView]:
        response = await _tasks(channel).ListTasks(
            task_service_pb2.ListTasksRequest(
                queue=queue or "",
                state=state,  # type: ignore[arg-type]
                type=type or "",
                page_size=page_size,
            ),
            timeout=seconds,
        )
        return [
            TaskView(security.open_task(g, Task.from_proto(t)), t.uncounted_attempts, False)
            for t in response.tasks
        ]

    result: list[TaskView] = run(g, method)
    return result


async def queues_on(channel: grpc.aio.Channel, seconds: float) -> list[task_pb2.QueueStats]:
    """ListQueues on ``channel`` (a method for :func:`run` or :func:`call`)."""
    response = await _tasks(channel).ListQueues(
        task_service_pb2.ListQueuesRequest(), timeout=seconds
    )
    return list(response.queues)


def list_queues(g: Globals) -> list[task_pb2.QueueStats]:
    result: list[task_pb2.QueueStats] = run(g, queues_on)
    return result


async def _cluster_status(
    channel: grpc.aio.Channel, seconds: float
) -> admin_service_pb2.GetClusterStatusResponse:
    stub = admin_service_pb2_grpc.AdminServiceStub(channel)
    response: admin_service_pb2.GetClusterStatusResponse = await stub.GetClusterStatus(
        admin_service_pb2.GetClusterStatusRequest(), timeout=seconds
    )
    return response


async def cluster_status(g: Globals) -> admin_service_pb2.GetClusterStatusResponse:
    """The cluster status, from the leader when a follower answered first (only the leader
    knows the workers)."""
    status = await call(g, _cluster_status)
    leader = status.leader.address
    if leader and not status.answered_by.leader and leader not in g.addresses[:1]:
        try:
            return await call(dataclasses.replace(g, coordinator=leader), _cluster_status)
        except RemoteError:
            pass  # the follower's answer still says who leads; show that
    return status
