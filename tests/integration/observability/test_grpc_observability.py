"""The RPC metrics interceptor and the gRPC tracing interceptors on a real grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from testsupport import eventually, health_stub

from conveyor.observability.grpc_metrics import MetricsInterceptor
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.observability.tracing import Tracing

HEALTH = "grpc.health.v1.Health"


async def _fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("a bug in a handler")


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad field")


class Served:
    def __init__(self, metrics: CoordinatorMetrics, tracing: Tracing, address: str) -> None:
        self.metrics, self.tracing, self.address = metrics, tracing, address

    def count(self, service: str, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "conveyor_rpc_duration_seconds_count",
            {"service": service, "method": method, "code": code},
        )
        return value or 0.0


@pytest.fixture
async def served() -> AsyncIterator[tuple[Served, InMemorySpanExporter]]:
    metrics = CoordinatorMetrics(process_metrics=False)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing = Tracing(provider)
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(metrics.rpc_duration), *tracing.server_interceptors()]
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("conveyor.v1.TaskService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Faulty",
                {
                    "Fail": grpc.unary_unary_rpc_method_handler(_fail),
                    "Refuse": grpc.unary_unary_rpc_method_handler(_refuse),
                    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(metrics, tracing, f"127.0.0.1:{port}"), spans
    finally:
        await server.stop(grace=None)


async def test_every_call_is_timed_with_the_code_the_client_saw(
    served: tuple[Served, InMemorySpanExporter],
) -> None:
    s, _ = served
    async with grpc.aio.insecure_channel(s.address) as channel:
        stub = health_stub(channel)
        for _ in range(3):
            await stub.Check(health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService"))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        for method, expected in (
            ("Fail", grpc.StatusCode.UNKNOWN),
            ("Refuse", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/test.Faulty/{method}"
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(b"", timeout=5)
            assert failed.value.code() == expected
        # A response stream the client abandons counts as CANCELLED once it ends.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService"))
        first = await asyncio.wait_for(watch.read(), 5)
        assert isinstance(first, health_pb2.HealthCheckResponse), first
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

    assert s.count(HEALTH, "Check", "OK") == 3
    assert s.count(HEALTH, "Check", "NOT_FOUND") == 1
    assert s.count("test.Faulty", "Fail", "UNKNOWN") == 1
    assert s.count("test.Faulty", "Refuse", "INVALID_ARGUMENT") == 1

    async def watch_recorded() -> bool:
        return s.count(HEALTH, "Watch", "CANCELLED") == 1

    await eventually(watch_recorded)


async def test_server_spans_are_children_of_the_callers_span(
    served: tuple[Served, InMemorySpanExporter],
) -> None:
    s, spans = served
    client_interceptors = s.tracing.client_interceptors()
    assert client_interceptors
    async with grpc.aio.insecure_channel(s.address, interceptors=client_interceptors) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/test.Faulty/Echo"
        )
        assert await echo(b"hi", timeout=5) == b"hi"
        # Health probes are not traced on the server (noise), but still answered.
        await health_stub(channel).Check(
            health_pb2.HealthCheckRequest(service="conveyor.v1.TaskService")
        )

    async def both() -> list[Any] | None:
        finished = [x for x in spans.get_finished_spans() if x.name.endswith("/Echo")]
        return finished if len(finished) == 2 else None

    finished = await eventually(both)
    client, server = sorted(finished, key=lambda x: x.kind.value == 1)  # SERVER is kind 1
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    checks = [x for x in spans.get_finished_spans() if x.name.endswith("/Check")]
    assert [x.kind.name for x in checks] == ["CLIENT"]


def test_disabled_tracing_adds_no_interceptors() -> None:
    tracing = Tracing.disabled()
    assert tracing.server_interceptors() == []
    assert tracing.client_interceptors() == []
