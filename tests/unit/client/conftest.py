"""A real grpc.aio server with a scripted, in-memory TaskService for client unit tests.

Tests get at the helpers through fixtures (``fake``, ``start_server``, ``make_status``)
because with ``--import-mode=importlib`` test modules cannot import one another.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from processes import free_port

from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

# A watch script item that makes the stream hang until the client goes away.
HANG = "hang"

_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}


def make_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str | None = None,
    metadata: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    violations: list[tuple[str, str]] | None = None,
) -> grpc.Status:
    """A status with google.rpc details, the way the coordinator builds them."""
    details = []
    if reason is not None:
        info = error_details_pb2.ErrorInfo(
            reason=reason, domain="conveyor.dev", metadata=dict(metadata or {})
        )
        details.append(info)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    status = status_pb2.Status(code=_CODE_NUMBERS[code], message=message, details=packed)
    assert status.code != code_pb2.OK
    return rpc_status.to_status(status)


class FakeTaskService(task_service_pb2_grpc.TaskServiceServicer):
    """Stores tasks in a dict, fails on demand, and plays scripted watch streams."""

    def __init__(self) -> None:
        self.tasks: dict[str, task_pb2.Task] = {}
        # method name -> how the next calls end, in order: a status to fail with, a bare
        # code (as gRPC reports a broken connection), or None to succeed.
        self.failures: dict[str, list[grpc.Status | grpc.StatusCode | None]] = defaultdict(list)
        # method name -> status to fail every call with.
        self.always_fail: dict[str, grpc.Status] = {}
        # (method, request, invocation metadata) for every call received.
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        # task id -> one list per WatchTask call, played in order: tasks (or whole
        # responses) to send, a status or bare code to end with, HANG, or a callable to run
        # (a change behind its back).
        self.watch_scripts: dict[str, list[list[Any]]] = defaultdict(list)
        self.queues: list[task_pb2.QueueStats] = []
        self.delay: dict[str, float] = {}
        # Task ids GetTask reports as unserved (no connected worker takes them).
        self.unserved: set[str] = set()
        self._ids = itertools.count(1)

    def add_task(self, **fields: Any) -> task_pb2.Task:
        fields.setdefault("id", f"task-{next(self._ids)}")
        fields.setdefault("state", task_pb2.TASK_STATE_PENDING)
        fields.setdefault("queue", "default")
        fields.setdefault("type", "demo")
        task = task_pb2.Task(**fields)
        self.tasks[task.id] = task
        return task

    def fail(self, method: str, status: grpc.Status | grpc.StatusCode, times: int = 1) -> None:
        self.failures[method].extend([status] * times)

    def count(self, method: str) -> int:
        return sum(1 for name, _, _ in self.calls if name == method)

    def requests(self, method: str) -> list[Any]:
        return [request for name, request, _ in self.calls if name == method]

    async def _enter(self, method: str, request: Any, context: Any) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((method, request, metadata))
        if method in self.delay:
            await asyncio.sleep(self.delay[method])
        status: grpc.Status | grpc.StatusCode | None = self.always_fail.get(method)
        if status is None and self.failures[method]:
            status = self.failures[method].pop(0)
        if isinstance(status, grpc.StatusCode):
            # A bare code: what gRPC itself produces when a connection breaks (no details).
            await context.abort(status, f"injected {status.name}")
        if status is not None:
            await context.abort_with_status(status)

    def _not_found(self, task_id: str) -> grpc.Status:
        return make_status(
            grpc.StatusCode.NOT_FOUND,
            f"task {task_id} not found",
            reason="TASK_NOT_FOUND",
            metadata={"task_id": task_id},
        )

    def _new_task(self, request: task_service_pb2.SubmitTaskRequest) -> task_pb2.Task:
        task = self.add_task(
            queue=request.queue or "default",
            type=request.type,
            payload=request.payload,
            content_type=request.content_type,
            priority=request.priority,
            max_attempts=request.max_attempts or 3,
            idempotency_key=request.idempotency_key,
            labels=dict(request.labels),
        )
        if request.HasField("run_at"):
            task.run_at.CopyFrom(request.run_at)
        task.create_time.GetCurrentTime()
        return task

    async def SubmitTask(self, request: Any, context: Any) -> Any:
        await self._enter("SubmitTask", request, context)
        return task_service_pb2.SubmitTaskResponse(task=self._new_task(request))

    async def SubmitTasks(self, request: Any, context: Any) -> Any:
        await self._enter("SubmitTasks", request, context)
        results = [
            task_service_pb2.SubmitTaskResponse(task=self._new_task(t)) for t in request.tasks
        ]
        return task_service_pb2.SubmitTasksResponse(results=results)

    async def GetTask(self, request: Any, context: Any) -> Any:
        await self._enter("GetTask", request, context)
        if request.id not in self.tasks:
            await context.abort_with_status(self._not_found(request.id))
        attempts = [
            task_pb2.TaskAttempt(
                attempt=1,
                worker_id="w1",
                outcome=task_pb2.ATTEMPT_OUTCOME_FAILED,
                error="boom",
            )
        ]
        return task_service_pb2.GetTaskResponse(
            task=self.tasks[request.id], attempts=attempts, unserved=request.id in self.unserved
        )

    async def ListTasks(self, request: Any, context: Any) -> Any:
        await self._enter("ListTasks", request, context)
        tasks = [
            t
            for t in self.tasks.values()
            if (not request.queue or t.queue == request.queue)
            and (not request.state or t.state == request.state)
            and (not request.type or t.type == request.type)
        ]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        end = start + size
        token = str(end) if end < len(tasks) else ""
        return task_service_pb2.ListTasksResponse(tasks=tasks[start:end], next_page_token=token)

    async def _transition(
        self,
        method: str,
        request: Any,
        context: Any,
        allowed: set[task_pb2.TaskState.ValueType],
    ) -> Any:
        await self._enter(method, request, context)
        task = self.tasks.get(request.id)
        if task is None:
            await context.abort_with_status(self._not_found(request.id))
        assert task is not None
        if task.state not in allowed:
            state = task_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_")
            await context.abort_with_status(
                make_status(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task is {state}",
                    reason="INVALID_STATE",
                    metadata={"task_id": task.id, "state": state},
                )
            )
        return task

    async def CancelTask(self, request: Any, context: Any) -> Any:
        active = {task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_SCHEDULED}
        active.add(task_pb2.TASK_STATE_RUNNING)
        task = await self._transition("CancelTask", request, context, active)
        task.state = task_pb2.TASK_STATE_CANCELLED
        return task_service_pb2.CancelTaskResponse(task=task)

    async def RetryTask(self, request: Any, context: Any) -> Any:
        task = await self._transition("RetryTask", request, context, {task_pb2.TASK_STATE_DEAD})
        task.state = task_pb2.TASK_STATE_PENDING
        return task_service_pb2.RetryTaskResponse(task=task)

    async def ListQueues(self, request: Any, context: Any) -> Any:
        await self._enter("ListQueues", request, context)
        return task_service_pb2.ListQueuesResponse(queues=self.queues)

    async def WatchTask(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self._enter("WatchTask", request, context)
        scripts = self.watch_scripts[request.id]
        if not scripts:
            if request.id not in self.tasks:
                await context.abort_with_status(self._not_found(request.id))
            # No script: the current state, and an end if it is terminal.
            yield task_service_pb2.WatchTaskResponse(task=self.tasks[request.id])
            return
        for item in scripts.pop(0):
            if item == HANG:
                await asyncio.Event().wait()
            elif callable(item):
                item()
            elif isinstance(item, grpc.StatusCode):
                await context.abort(item, f"injected {item.name}")
            elif isinstance(item, task_pb2.Task):
                self.tasks[item.id] = item
                yield task_service_pb2.WatchTaskResponse(task=item)
            elif isinstance(item, task_service_pb2.WatchTaskResponse):
                self.tasks[item.task.id] = item.task
                yield item
            else:
                await context.abort_with_status(item)


StartServer = Callable[[FakeTaskService], Awaitable[str]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Starts real grpc.aio servers for fakes; returns their addresses; stops them after."""
    servers: list[grpc.aio.Server] = []

    async def start(fake: FakeTaskService) -> str:
        server = grpc.aio.server()
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture
def fake() -> FakeTaskService:
    return FakeTaskService()  # type: ignore[abstract]  # a fake: schedules go unserved


@pytest.fixture
def fake_factory() -> Callable[[], FakeTaskService]:
    return FakeTaskService


@pytest.fixture
async def address(fake: FakeTaskService, start_server: StartServer) -> str:
    return await start_server(fake)


@pytest.fixture
def status() -> Callable[..., grpc.Status]:
    """make_status(code, message, *, reason, metadata, retry_after, violations)."""
    return make_status


@pytest.fixture
def dead_address() -> str:
    """An address where nothing listens: connecting is refused at once."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def hang() -> str:
    return HANG
