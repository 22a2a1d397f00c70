"""The interceptor chain on a real grpc.aio server with a stand-in handler: errors leave
with the right status (never UNKNOWN), followers refuse, the request context is filled."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.coordinator.api import context
from conveyor.coordinator.api.interceptors.chain import server_interceptors
from conveyor.coordinator.api.interceptors.leader import ANY_COORDINATOR
from conveyor.coordinator.errors import TaskNotFound
from conveyor.v1 import task_service_pb2

SERVICE = "conveyor.v1.TaskService"
GET = f"/{SERVICE}/GetTask"
CANCEL = f"/{SERVICE}/CancelTask"
"""Leader-only (GetTask is served by every coordinator); the stand-in takes either."""

Behavior = Callable[[task_service_pb2.GetTaskRequest], Any]


class Harness:
    def __init__(self) -> None:
        self.behavior: Behavior = lambda request: task_service_pb2.GetTaskResponse()
        self.leader = True
        self.seen: list[context.RequestContext] = []

    async def handle(self, request: Any, _: Any) -> Any:
        self.seen.append(context.current())
        return self.behavior(request)


@pytest.fixture
async def harness() -> AsyncIterator[tuple[Harness, grpc.aio.Channel]]:
    h = Harness()
    server = grpc.aio.server(
        interceptors=server_interceptors(is_leader=lambda: h.leader, leader_address=lambda: "L:1")
    )
    handler = grpc.unary_unary_rpc_method_handler(
        h.handle,
        request_deserializer=task_service_pb2.GetTaskRequest.FromString,
        response_serializer=task_service_pb2.GetTaskResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"GetTask": handler, "CancelTask": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield h, channel
    finally:
        await channel.close()
        await server.stop(None)


async def _call(
    channel: grpc.aio.Channel, raw: bytes, method: str = GET, **kwargs: Any
) -> grpc.aio.AioRpcError:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw, **kwargs)
    return caught.value


def _info(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    if detail.Is(cls.DESCRIPTOR):
                        message = cls()
                        detail.Unpack(message)
                        found[cls.__name__] = message
    return found


def _raise(exc: BaseException) -> Behavior:
    def behavior(request: Any) -> Any:
        raise exc

    return behavior


REQUEST = task_service_pb2.GetTaskRequest(id="x").SerializeToString()


async def test_domain_errors_keep_their_status(harness: tuple[Harness, grpc.aio.Channel]) -> None:
    h, channel = harness
    h.behavior = _raise(TaskNotFound("x"))
    error = await _call(channel, REQUEST)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert _info(error)["ErrorInfo"].reason == "TASK_NOT_FOUND"


async def test_a_postgresql_restart_is_unavailable_with_retry_info(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    h.behavior = _raise(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    error = await _call(channel, REQUEST)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = _info(error)
    assert details["ErrorInfo"].reason == "STORE_UNAVAILABLE" and "RetryInfo" in details


async def test_a_bug_is_internal_with_the_request_id(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    h.behavior = _raise(KeyError("oops"))
    error = await _call(channel, REQUEST, metadata=(("x-request-id", "req-42"),))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "req-42" in (error.details() or "")


async def test_an_undecodable_request_is_invalid_argument(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    # Field 1 (id, a string) holding bytes that are not UTF-8.
    error = await _call(channel, b"\x0a\x02\xff\xfe")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(error)["ErrorInfo"].reason == "INVALID_ARGUMENT"
    assert h.seen == []


async def test_a_follower_refuses_with_the_leaders_address(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    h.leader = False
    error = await _call(channel, REQUEST, CANCEL)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _info(error)["ErrorInfo"].metadata["leader_address"] == "L:1"
    assert h.seen == []


async def test_a_follower_serves_reads_and_submits(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    h.leader = False
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        GET, request_serializer=None, response_deserializer=None
    )
    await call(REQUEST, timeout=30)
    assert [seen.method for seen in h.seen] == [GET]
    served = {m.rsplit("/", 1)[1] for m in ANY_COORDINATOR if m.startswith(f"/{SERVICE}/")}
    assert {
        "SubmitTask",
        "SubmitTasks",
        "GetTask",
        "ListTasks",
        "WatchTask",
        "ListQueues",
        "ListRateLimits",
        "ListDeadTasks",
    } <= served
    # Dispatch state and the leader's memory (its workers) stay the leader's.
    assert not served & {"CancelTask", "RetryTask", "UpdateTask", "PauseQueue", "ListWorkers"}


async def test_the_handler_reads_the_request_context(
    harness: tuple[Harness, grpc.aio.Channel],
) -> None:
    h, channel = harness
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        GET, request_serializer=None, response_deserializer=None
    )
    await call(
        REQUEST,
        timeout=30,
        metadata=(("x-request-id", "r-1"), ("traceparent", "00-abc-def-01")),
    )
    (seen,) = h.seen
    assert (seen.method, seen.request_id, seen.traceparent, seen.tenant) == (
        GET,
        "r-1",
        "00-abc-def-01",
        "default",
    )
    assert seen.peer and seen.deadline is not None
    assert context.current().request_id == ""  # nothing leaks out of the call
