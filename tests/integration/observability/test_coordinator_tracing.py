"""A coordinator with tracing on (an in-memory exporter here; over OTLP in
test_trace_across_processes.py): each leased attempt gets a ``dispatch`` span, child of
the task's stored traceparent, and the Assignment carries the dispatch span's context,
by the claim and by the hand-off of a fresh submit to a waiting worker alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from testsupport import RawWorker, coordinator_config, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.observability.tracing import Tracing
from conveyor.v1 import task_service_pb2_grpc

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def coordinator(database_dsn: str, spans: InMemorySpanExporter) -> AsyncIterator[Coordinator]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    coord = Coordinator(coordinator_config(database_dsn), tracing=Tracing(provider))
    await coord.start()
    try:
        yield coord
    finally:
        await coord.stop(grace=1.0)


def ids(traceparent: str) -> tuple[str, str]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def dispatch_span(spans: InMemorySpanExporter, span_id: str) -> ReadableSpan:
    (span,) = [s for s in spans.get_finished_spans() if f"{s.context.span_id:016x}" == span_id]
    return span


async def test_claimed_and_handed_off_attempts_get_dispatch_spans(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    spans: InMemorySpanExporter,
) -> None:
    claimed = await submit(stub, "echo", queue="t", traceparent=TRACEPARENT)
    worker = raw_workers()
    await worker.connect("w", credits=5, types=("echo",), queues=("t",))
    (first,) = await worker.assignments(1)
    assert (await worker.report(first.lease)).accepted

    # The worker waits with credit left: the next submit is handed to it directly.
    handed = await submit(stub, "echo", queue="t", traceparent=TRACEPARENT)
    (second,) = await worker.assignments(1)
    assert second.lease.task_id == handed.id and handed.state == 3  # RUNNING at once

    for task, assignment in ((claimed, first), (handed, second)):
        trace_id, span_id = ids(assignment.traceparent)
        assert trace_id == TRACE and span_id != PARENT
        span = dispatch_span(spans, span_id)
        assert span.name == "dispatch echo" and span.kind is SpanKind.PRODUCER
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
        assert (
            dict(span.attributes or {}).items()
            >= {
                "conveyor.task.id": task.id,
                "conveyor.queue": "t",
                "conveyor.task.type": "echo",
                "conveyor.task.attempt": 1,
                "conveyor.tenant": "default",
            }.items()
        )

    # RPCs are traced too (a server span each), but not the worker stream.
    async def submit_spans() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.kind is SpanKind.SERVER and s.name.endswith("TaskService/SubmitTask")
        ]

    assert len(await eventually(submit_spans)) == 2
    assert not [s for s in spans.get_finished_spans() if "Connect" in s.name]


async def test_a_task_submitted_without_a_trace_starts_one_at_dispatch(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    spans: InMemorySpanExporter,
) -> None:
    await submit(stub, "echo", queue="u")
    worker = raw_workers()
    await worker.connect("w", credits=1, types=("echo",), queues=("u",))
    (assignment,) = await worker.assignments(1)
    _, span_id = ids(assignment.traceparent)
    span = dispatch_span(spans, span_id)
    assert span.parent is None
