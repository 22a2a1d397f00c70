"""The client's ``submit`` span: the task carries its context (as stored by a real
coordinator), it nests under the caller's span, the blocking client included, and a
``submit_many`` call is one span."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conveyor.client import AsyncClient, Client, TaskSpec
from conveyor.coordinator import Coordinator

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider, spans


def context_of(traceparent: str | None) -> tuple[int, int]:
    assert traceparent
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_submits_carry_their_span_and_nest_under_the_callers(
    coordinator: Coordinator,
) -> None:
    provider, spans = traced()
    async with AsyncClient(coordinator.address, tracer_provider=provider) as client:
        with provider.get_tracer("app").start_as_current_span("checkout") as app_span:
            task = await client.submit("email", {"to": "ada"}, queue="mail")
        explicit = await client.submit("email", traceparent=CALLER)
        batch = await client.submit_many(
            [
                TaskSpec(type="email"),
                TaskSpec(type="email"),
                TaskSpec(type="email", traceparent=CALLER),
            ]
        )
        stored = await client.get(task.id)

    submit, explicit_span, many = [s for s in spans.get_finished_spans() if s.name != "checkout"]
    assert submit.name == "submit email" and submit.kind is SpanKind.PRODUCER
    assert (
        submit.parent is not None and submit.parent.span_id == app_span.get_span_context().span_id
    )
    assert (
        dict(submit.attributes or {}).items()
        >= {
            "conveyor.queue": "mail",
            "conveyor.task.type": "email",
        }.items()
    )
    # What the coordinator stored with the task is the submit span's context.
    assert context_of(stored.traceparent) == (submit.context.trace_id, submit.context.span_id)

    # An explicit traceparent is the submit span's parent.
    assert explicit_span.parent is not None
    assert (explicit_span.context.trace_id, explicit_span.parent.span_id) == context_of(CALLER)
    assert context_of(explicit.traceparent)[1] == explicit_span.context.span_id

    # One span for the batch; a task with its own traceparent keeps it.
    assert many.name == "submit email"
    assert (many.attributes or {})["messaging.batch.message_count"] == 3
    assert [context_of(t.traceparent)[1] for t in batch[:2]] == [many.context.span_id] * 2
    assert batch[2].traceparent == CALLER


async def test_the_blocking_client_submits_in_the_callers_context(
    coordinator: Coordinator,
) -> None:
    provider, spans = traced()

    def in_app() -> str | None:
        with (
            Client(coordinator.address, tracer_provider=provider) as client,
            provider.get_tracer("app").start_as_current_span("job"),
        ):
            return client.submit("email").traceparent

    traceparent = await asyncio.to_thread(in_app)
    job = next(s for s in spans.get_finished_spans() if s.name == "job")
    submit = next(s for s in spans.get_finished_spans() if s.name == "submit email")
    assert submit.parent is not None and submit.parent.span_id == job.context.span_id
    assert context_of(traceparent) == (job.context.trace_id, submit.context.span_id)


async def test_without_a_tracer_provider_a_submit_carries_only_what_it_is_given(
    coordinator: Coordinator,
) -> None:
    async with AsyncClient(coordinator.address) as client:
        assert not client._tracing().enabled
        plain = await client.submit("email")
        given = await client.submit("email", traceparent=CALLER)
    assert plain.traceparent is None
    assert given.traceparent == CALLER
