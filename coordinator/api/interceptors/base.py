"""What every interceptor here shares: wrapping the behavior of each ``conveyor.v1`` method.

gRPC looks the method up for every call and runs the interceptors on the way; each of ours
wraps the behavior (the handler function) once per method and caches the result, so a call
costs one dict lookup per interceptor. Methods of other services (health, reflection)
pass through unwrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Deserializer = Callable[[bytes], Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # generic in the stubs only
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]

CONVEYOR_METHODS = "/conveyor.v1."

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: Handler) -> Behavior:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    return cast(Behavior, behavior)


class BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """Base of the coordinator's interceptors: override :meth:`wrap` (and, to decode
    requests differently, :meth:`deserializer`)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        """The behavior to run for ``method`` instead of ``behavior`` (which it calls)."""
        return behavior

    def deserializer(self, method: str, inner: Deserializer | None) -> Deserializer | None:
        return inner

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(CONVEYOR_METHODS):
            return handler
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        behavior = behavior_of(handler)
        wrapped = self.wrap(method, behavior)
        deserializer = self.deserializer(method, handler.request_deserializer)
        if wrapped is behavior and deserializer is handler.request_deserializer:
            new = handler
        else:
            factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
            new = factory(
                wrapped,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        self._wrapped[method] = (handler, new)
        return new


FIRST_MESSAGE_WAIT = 1.0
"""Longest a refusal of a stream waits for the stream's first message."""


async def take_first_message(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Reads the caller's first message (a worker's Hello) before a refusal of a stream,
    at most for a moment.

    A client still writing when the status arrives would report its own failed write
    (INTERNAL "Internal error from Core") instead of the refusal: taking the message it
    sends first lets the refusal be what it reads. (A request this large would have been
    read anyway for a unary call; the message limit bounds it.) Measured on a follower
    refusing 2,000 worker streams from another process: 109 ended so without it, none
    with it.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(FIRST_MESSAGE_WAIT):
            await context.read()
