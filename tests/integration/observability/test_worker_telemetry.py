"""The worker SDK's telemetry against a real coordinator: its metrics endpoint (handler
runs by outcome, slots, connection, reconnects), the ``execute`` span of each attempt,
and the task fields on log lines (``ctx.logger`` and any logger a handler uses)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from metrics_scrape import Page, scrape
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from testsupport import eventually

from conveyor.client import AsyncClient
from conveyor.coordinator import Coordinator
from conveyor.observability import logs
from conveyor.worker import NonRetryableError, TaskContext, Worker

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The root logger writes JSON lines into a buffer (the previous set-up restored)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    logs.configure("info", "json", stream=buffer)
    yield buffer
    root.handlers[:], level = saved
    root.setLevel(level)


def build_worker(address: str, provider: TracerProvider) -> Worker:
    worker = Worker(
        address,
        queues=["obs"],
        concurrency=4,
        worker_id="obs-worker",
        metrics_listen="127.0.0.1:0",
        tracer_provider=provider,
    )
    app_log = logging.getLogger("app.tasks")
    app_tracer = provider.get_tracer("app")

    @worker.task("ok")
    async def ok(ctx: TaskContext, payload: Any) -> str:
        ctx.logger.info("sending %s", payload)
        app_log.info("plain logger inside the handler")
        return "done"

    @worker.task("boom")
    async def boom(ctx: TaskContext, payload: Any) -> None:
        raise NonRetryableError("no such recipient")

    @worker.task("slow")
    async def slow(ctx: TaskContext, payload: Any) -> None:
        await asyncio.sleep(3600)

    @worker.task("hold")
    async def hold(ctx: TaskContext, payload: Any) -> None:
        await ctx.cancelled.wait()

    @worker.task("sync")
    def sync(ctx: TaskContext, payload: Any) -> str:
        with app_tracer.start_as_current_span("smtp"):
            app_log.info("in a thread")
        return "done"

    return worker


async def test_metrics_spans_and_log_fields_of_handler_runs(
    coordinator: Coordinator, log_lines: io.StringIO
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    worker = build_worker(coordinator.address, provider)
    async with worker, AsyncClient(coordinator.address) as client:
        await asyncio.wait_for(worker.wait_connected(), 10)
        assert worker.metrics_url.startswith("http://127.0.0.1:")
        ok = await client.submit("ok", "mail", queue="obs", traceparent=TRACEPARENT)
        boom = await client.submit("boom", queue="obs", max_attempts=1)
        sync = await client.submit("sync", queue="obs")
        slow = await client.submit("slow", queue="obs", timeout=0.3, max_attempts=1)
        for task in (ok, boom, sync, slow):
            await client.wait(task.id, timeout=30)
        held = await client.submit("hold", queue="obs")

        async def holding() -> bool:
            p = await scrape(worker.metrics_url)
            return p.value("conveyor_worker_running_tasks") == 1

        await eventually(holding)
        await client.cancel(held.id)  # the worker is told to stop it

        async def recorded() -> Page | None:
            p = await scrape(worker.metrics_url)
            return p if p.value("conveyor_worker_executions_total") == 5 else None

        p = await eventually(recorded, timeout=15)

        def runs(type_: str, outcome: str) -> float:
            return p.value(
                "conveyor_worker_executions_total", queue="obs", type=type_, outcome=outcome
            )

        assert runs("ok", "succeeded") == runs("sync", "succeeded") == 1
        assert runs("boom", "failed") == 1
        assert runs("slow", "timed_out") == 1
        assert runs("hold", "cancelled") == 1
        slow_time = p.value(
            "conveyor_worker_execution_seconds_sum", type="slow", outcome="timed_out"
        )
        assert 0.3 <= slow_time < 30
        assert p.value("conveyor_worker_execution_seconds_count") == 5
        assert p.value("conveyor_worker_concurrency") == 4

        async def idle() -> bool:
            return (await scrape(worker.metrics_url)).value("conveyor_worker_running_tasks") == 0

        await eventually(idle)
        assert p.value("conveyor_worker_connected") == 1
        assert p.value("conveyor_worker_reconnects_total") == 0
        assert p.has("conveyor_build_info", component="worker")

        # The coordinator cuts the stream: the worker reconnects, and counts it.
        session = coordinator.sessions.by_worker("default", "obs-worker")
        assert session is not None
        session.end("cut by the test", evict="silent")

        async def reconnected() -> bool:
            again = await scrape(worker.metrics_url)
            return again.value("conveyor_worker_reconnects_total") == 1 and (
                again.value("conveyor_worker_connected") == 1
            )

        await eventually(reconnected, timeout=15)
    assert worker.metrics_url == ""  # stopped with the worker

    executions = {s.name: s for s in spans.get_finished_spans() if s.name.startswith("execute")}
    assert set(executions) == {
        "execute ok",
        "execute boom",
        "execute sync",
        "execute slow",
        "execute hold",
    }
    traced = executions["execute ok"]
    assert traced.kind is SpanKind.CONSUMER
    assert traced.context.trace_id == int(TRACE, 16)
    assert traced.parent is not None and traced.parent.span_id == int(PARENT, 16)
    assert (
        dict(traced.attributes or {}).items()
        >= {
            "conveyor.task.id": ok.id,
            "conveyor.queue": "obs",
            "conveyor.task.type": "ok",
            "conveyor.task.attempt": 1,
            "conveyor.task.outcome": "succeeded",
        }.items()
    )
    assert traced.status.status_code is not StatusCode.ERROR
    for name, outcome in (("execute boom", "failed"), ("execute slow", "timed_out")):
        span = executions[name]
        assert span.status.status_code is StatusCode.ERROR, name
        assert (span.attributes or {})["conveyor.task.outcome"] == outcome
    (smtp,) = [s for s in spans.get_finished_spans() if s.name == "smtp"]
    assert _parent_of(smtp) == executions["execute sync"].context.span_id
    # The client has no tracer provider (none was set up globally): no submit spans.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("submit ")]

    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    fields = {"task_id", "attempt", "queue", "type", "worker_id", "tenant", "epoch"}

    def line(message: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [entry for entry in lines if entry["message"] == message]
        (entry,) = found
        return entry

    for message, task in (
        ("sending mail", ok),
        ("plain logger inside the handler", ok),
        ("in a thread", sync),
    ):
        entry = line(message)
        assert fields <= entry.keys(), (message, entry)
        assert entry["task_id"] == task.id and entry["worker_id"] == "obs-worker"
        assert entry["queue"] == "obs" and entry["attempt"] == 1
        assert entry["epoch"] == coordinator.epoch and entry["tenant"] == "default"
    assert line("sending mail")["logger"] == "conveyor.task"
    # The SDK's own line about the failure carries the fields too.
    (failed,) = [e for e in lines if "failed for good" in e["message"]]
    assert failed["task_id"] == boom.id and failed["type"] == "boom"
    # Lines outside any task have none.
    outside = [e for e in lines if e["message"].startswith("worker obs-worker starting")]
    assert outside and "task_id" not in outside[0]
    # ...and the span of the thread's line is the handler's own.
    assert line("in a thread")["span_id"] == f"{smtp.context.span_id:016x}"


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_without_metrics_or_tracing_nothing_is_served_noted_or_traced(
    coordinator: Coordinator,
) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    worker = Worker(coordinator.address, queues=["plain"], concurrency=2)

    @worker.task("ok")
    async def ok(ctx: TaskContext, payload: Any) -> str:
        assert not trace.get_current_span().get_span_context().is_valid
        return "done"

    async with worker, AsyncClient(coordinator.address) as client:
        await asyncio.wait_for(worker.wait_connected(), 10)
        assert worker.metrics_url == ""
        runtime = worker._runtime
        assert runtime is not None and runtime._runs is None and not runtime._tracing.enabled
        task = await client.submit("ok", queue="plain")
        assert await client.result(task.id, timeout=30) == "done"


async def test_a_busy_metrics_port_fails_the_worker_before_it_connects(
    coordinator: Coordinator,
) -> None:
    first = Worker(coordinator.address, metrics_listen="127.0.0.1:0")
    first.register("ok", lambda ctx, payload: None)
    async with first:
        port = first.metrics_url.rsplit(":", 1)[1].split("/")[0]
        second = Worker(coordinator.address, metrics_listen=f"127.0.0.1:{port}")
        second.register("ok", lambda ctx, payload: None)
        started = time.monotonic()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await second.run()
        assert not second.running and time.monotonic() - started < 5
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        Worker(coordinator.address, metrics_listen="nonsense")
