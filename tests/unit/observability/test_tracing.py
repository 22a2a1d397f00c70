"""Tracing set-up and span helpers (conveyor.observability.tracing), in memory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from conveyor.observability.tracing import (
    ATTRIBUTES,
    Tracing,
    current_traceparent,
    endpoint_from_env,
)

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def recorded() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


def attributes(span: ReadableSpan) -> Mapping[str, object]:
    """A finished span's attributes (the SDK types them optional)."""
    assert span.attributes is not None, span
    return span.attributes


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "http://collector:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
            },
            "http://traces:4317",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_endpoint_from_env(env: dict[str, str], expected: str | None) -> None:
    assert endpoint_from_env(env) == expected


def test_from_env_without_an_endpoint_is_disabled_and_helpers_pass_through() -> None:
    tracing = Tracing.from_env("svc", env={})
    assert not tracing.enabled and tracing.provider is None
    rows = [{"traceparent": PARENT, "id": "t", "queue": "q", "type": "x", "attempt": 1}]
    assert tracing.dispatch_spans(rows) == [PARENT]
    with tracing.execution_span(PARENT, task_id="t", queue="q", type_="x", attempt=1) as span:
        assert span is None
    Tracing.record_outcome(span, "failed", "boom")  # a no-op on None
    with tracing.submit_span("x", "q") as traceparent:
        assert traceparent == ""  # no current span in the caller either


def test_a_disabled_submit_still_joins_the_callers_own_trace(
    recorded: tuple[Tracing, InMemorySpanExporter],
) -> None:
    app, _ = recorded
    assert app.provider is not None
    with app.provider.get_tracer("app").start_as_current_span("request") as span:
        with Tracing.disabled().submit_span("x", "q") as traceparent:
            pass
        assert current_traceparent() == traceparent
    context = span.get_span_context()
    assert traceparent.split("-")[1:3] == [f"{context.trace_id:032x}", f"{context.span_id:016x}"]


def test_dispatch_and_execution_nest_under_the_stored_traceparent(
    recorded: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = recorded
    rows = [
        {"traceparent": PARENT, "id": "t1", "queue": "q", "type": "x", "attempt": 2, "tenant": "a"},
        {"traceparent": "", "id": "t2", "queue": "q", "type": "x", "attempt": 1, "tenant": "a"},
        {"traceparent": "garbage", "id": "t3", "queue": "q", "type": "x", "attempt": 1,
         "tenant": "a"},
    ]  # fmt: skip
    children = tracing.dispatch_spans(rows, start_time_ns=1)
    with tracing.execution_span(
        children[0], task_id="t1", queue="q", type_="x", attempt=2, tenant="a"
    ) as span:
        tracing.record_outcome(span, "timed_out")
    dispatches = {attributes(s)["conveyor.task.id"]: s for s in by_name(exporter, "dispatch x")}
    (execution,) = by_name(exporter, "execute x")
    first = dispatches["t1"]
    assert first.parent is not None and f"{first.parent.span_id:016x}" == PARENT.split("-")[2]
    assert f"{first.context.trace_id:032x}" == PARENT.split("-")[1]
    assert first.start_time == 1
    # No (or an unreadable) traceparent: the dispatch starts a trace of its own.
    assert dispatches["t2"].parent is None and dispatches["t3"].parent is None
    assert execution.parent is not None and execution.parent.span_id == first.context.span_id
    for key in ATTRIBUTES:
        assert key in attributes(execution), key
    assert attributes(execution)["conveyor.task.attempt"] == 2
    assert attributes(execution)["conveyor.task.outcome"] == "timed_out"
    assert execution.status.status_code == StatusCode.ERROR


def test_an_exception_escaping_the_execution_span_is_recorded(
    recorded: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = recorded
    with (
        pytest.raises(KeyError),
        tracing.execution_span(PARENT, task_id="t", queue="q", type_="x", attempt=1),
    ):
        raise KeyError("missing")
    (span,) = by_name(exporter, "execute x")
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_submit_span_is_a_producer_span_whose_context_is_sent(
    recorded: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = recorded
    with tracing.submit_span("x", "q", tenant="a", count=3) as traceparent:
        pass
    (span,) = by_name(exporter, "submit x")
    assert traceparent.split("-")[2] == f"{span.context.span_id:016x}"
    assert span.kind.name == "PRODUCER"
    assert attributes(span)["messaging.batch.message_count"] == 3
    assert attributes(span)["conveyor.tenant"] == "a"


def test_from_env_honours_the_service_name_variable() -> None:
    tracing = Tracing.from_env(
        "conveyor-worker",
        endpoint="http://127.0.0.1:9",
        env={"OTEL_SERVICE_NAME": "billing-worker"},
    )
    try:
        assert tracing.enabled and tracing.provider is not None
        resource = tracing.provider.resource  # type: ignore[attr-defined]
        assert resource.attributes["service.name"] == "billing-worker"
    finally:
        tracing.shutdown()
