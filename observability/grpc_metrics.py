"""A grpc.aio server interceptor that times every RPC by service, method and status code
into ``conveyor_rpc_duration_seconds`` (its ``_count`` is the call count per code).

Once per call, never per task; streams are timed over their whole life. The code is the
one the client sees: the handler's ``context.abort``/``set_code``, UNKNOWN for an
exception that escaped, CANCELLED when the call was cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from conveyor.observability._histogram import BatchHistogram

__all__ = ["MetricsInterceptor"]

TRequest = TypeVar("TRequest")
TResponse = TypeVar("TResponse")


def _code_name(context: grpc.aio.ServicerContext[Any, Any], failed: BaseException | None) -> str:
    if isinstance(failed, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the caller went away (a closed stream ends its generator)
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # the Cython context reports a plain number
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "UNKNOWN" if failed is not None else "OK"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Observes ``histogram`` (labels service, method, code) for each call served.

    Pass ``CoordinatorMetrics.rpc_duration``; put it first among the interceptors so the
    time includes the others (authentication, tenant resolution).
    """

    def __init__(self, histogram: BatchHistogram) -> None:
        self._histogram = histogram
        # gRPC looks the handler up for every call; each method is wrapped once and the
        # wrapper reused while the inner handler is the same object.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[TRequest, TResponse] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[TRequest, TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED, nothing to label
        method: str = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is None or hit[0] is not handler:
            hit = self._wrapped[method] = (handler, self._wrap(handler, method))
        return cast("grpc.RpcMethodHandler[TRequest, TResponse]", hit[1])

    def _wrap(self, handler: Any, full_method: str) -> Any:
        _, _, full = full_method.partition("/")
        service, _, method = full.partition("/")
        histogram = self._histogram

        def record(
            context: grpc.aio.ServicerContext[Any, Any], start: float, failed: BaseException | None
        ) -> None:
            code = _code_name(context, failed)
            if failed is not None and code == "OK":
                code = "UNKNOWN"
            histogram.observe((service, method, code), time.perf_counter() - start)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, record),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_streaming(handler.unary_stream, record),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, record),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_streaming(handler.stream_stream, record),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_Record = Callable[[Any, float, BaseException | None], None]


def _wrap_unary(behavior: Any, record: _Record) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        failed: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            record(context, start, failed)

    return wrapper


def _wrap_streaming(behavior: Any, record: _Record) -> Any:
    """A response stream is an async generator, or a coroutine that calls
    ``context.write``; wrap each as what it is."""
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                failed = exc
                raise
            finally:
                record(context, start, failed)

        return generator
    return _wrap_unary(behavior, record)
