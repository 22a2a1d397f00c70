"""A second (and third) process for the tracing tests: the coordinator's and the worker's
half of a task's trace, exported over OTLP to wherever ``OTEL_EXPORTER_OTLP_ENDPOINT``
points.

    python trace_hop.py dispatch TRACEPARENT TASK_ID ATTEMPT...   prints a traceparent per attempt
    python trace_hop.py execute TASK_ID TRACEPARENT:ATTEMPT:OUTCOME...
    python trace_hop.py disabled                                   tracing off: prints what loaded

``execute`` runs a handler that opens a span of its own through the global API (as
application code would), to show it nests under the execution span.
"""

from __future__ import annotations

import json
import sys

from opentelemetry import trace

from conveyor.observability.tracing import SERVICE_COORDINATOR, SERVICE_WORKER, Tracing


def dispatch(traceparent: str, task_id: str, attempts: list[str]) -> None:
    tracing = Tracing.from_env(SERVICE_COORDINATOR, instance_id="coordinator-1")
    assert tracing.enabled, "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
    rows = [
        {
            "traceparent": traceparent,
            "id": task_id,
            "queue": "emails",
            "type": "send",
            "attempt": int(attempt),
            "tenant": "default",
        }
        for attempt in attempts
    ]
    for child in tracing.dispatch_spans(rows):
        print(child)
    tracing.shutdown()


def execute(task_id: str, runs: list[str]) -> None:
    tracing = Tracing.from_env(SERVICE_WORKER, set_global=True)
    assert tracing.enabled, "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
    app_tracer = trace.get_tracer("app")
    for run in runs:
        traceparent, attempt, outcome = run.rsplit(":", 2)
        with tracing.execution_span(
            traceparent,
            task_id=task_id,
            queue="emails",
            type_="send",
            attempt=int(attempt),
            tenant="default",
        ) as span:
            with app_tracer.start_as_current_span("smtp"):
                pass
            tracing.record_outcome(span, outcome, "" if outcome == "succeeded" else "boom")
    tracing.shutdown()


def disabled() -> None:
    tracing = Tracing.from_env(SERVICE_WORKER)
    with tracing.execution_span(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        task_id="t",
        queue="q",
        type_="x",
        attempt=1,
    ) as span:
        pass
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))
    print(json.dumps({"enabled": tracing.enabled, "span": span is not None, "sdk": loaded}))


def main(argv: list[str]) -> None:
    command, *rest = argv
    if command == "dispatch":
        dispatch(rest[0], rest[1], rest[2:])
    elif command == "execute":
        execute(rest[0], rest[1:])
    elif command == "disabled":
        disabled()
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
