"""One task through three real processes, observed from outside them.

The test process is the client (its ``submit`` span exported over OTLP); a coordinator
process and a worker process (``conveyor coordinator`` and ``conveyor worker``, with
``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``--log-format json``) run it: attempt 1 fails,
attempt 2 succeeds. A real OTLP/gRPC receiver started by the test gets every span: they
form one trace (submit -> dispatch per attempt -> execute per attempt -> the handler's
own span), with the task's attributes. The processes' JSON log lines carry the task's
fields as their own keys, and the handler's line names its span.

Without the variable, tracing loads nothing (``trace_hop.py disabled``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from cluster import CoordinatorProcess, WorkerProcess
from otlp_receiver import OtlpReceiver, ReceivedSpan
from processes import run
from testsupport import SUPPORT_DIR, eventually

from conveyor.client import AsyncClient, RetryPolicy, TaskState
from conveyor.observability.logs import FIELDS
from conveyor.observability.tracing import (
    SERVICE_CLIENT,
    SERVICE_COORDINATOR,
    SERVICE_WORKER,
    Tracing,
)

HOP = str(SUPPORT_DIR / "trace_hop.py")
SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 4, 5
STATUS_ERROR = 2


def otel_env(endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    return env


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def test_submit_dispatch_and_execution_form_one_trace(
    database_dsn: str, tmp_path: Path
) -> None:
    async with OtlpReceiver() as receiver:
        env = otel_env(receiver.endpoint)
        coordinator = CoordinatorProcess(
            database_dsn,
            None,
            log_dir=tmp_path,
            extra_args=["--log-format", "json"],
            env=env,
        )
        worker = WorkerProcess(
            coordinator.address,
            tmp_path / "effects.log",
            log_dir=tmp_path,
            queues=["emails"],
            extra_args=["--log-format", "json"],
            env={**env, "CONVEYOR_TEST_WORKER_ID": "traced-worker"},
        )
        client_tracing = Tracing.from_env(SERVICE_CLIENT, endpoint=receiver.endpoint)
        try:
            coordinator.start()
            await coordinator.wait_serving()
            worker.start()
            async with AsyncClient(
                coordinator.address, tracer_provider=client_tracing.provider
            ) as client:
                task = await client.submit(
                    "traced",
                    {"to": "ada"},
                    queue="emails",
                    retry_policy=RetryPolicy(initial_backoff=timedelta(milliseconds=100)),
                )
                done = await client.wait(task.id, timeout=60)
            assert done.state is TaskState.SUCCEEDED and done.attempt == 2
            await asyncio.to_thread(client_tracing.shutdown)

            def task_spans() -> list[ReceivedSpan] | None:
                mine = [s for s in receiver.spans if s.trace_id == _trace_of(task.traceparent)]
                return mine if len(mine) >= 7 else None

            spans = await eventually(task_spans, timeout=30)
        finally:
            worker.close()
            coordinator.close()

    names = sorted(s.name for s in spans)
    assert names == sorted(["submit traced"] + ["dispatch traced", "execute traced", "smtp"] * 2), (
        names
    )
    (submit,) = [s for s in spans if s.name == "submit traced"]
    dispatches = _by_attempt(s for s in spans if s.name == "dispatch traced")
    executions = _by_attempt(s for s in spans if s.name == "execute traced")
    handlers = [s for s in spans if s.name == "smtp"]
    assert submit.parent_span_id == "" and submit.service == SERVICE_CLIENT
    assert submit.kind == SPAN_KIND_PRODUCER
    for attempt, (dispatch, execution) in enumerate(zip(dispatches, executions, strict=True), 1):
        assert dispatch.service == SERVICE_COORDINATOR
        assert execution.service == SERVICE_WORKER
        assert dispatch.parent_span_id == submit.span_id, "retries stay in the one trace"
        assert execution.parent_span_id == dispatch.span_id
        assert execution.kind == SPAN_KIND_CONSUMER
        for span in (dispatch, execution):
            assert span.attributes["conveyor.task.id"] == task.id
            assert span.attributes["conveyor.queue"] == "emails"
            assert span.attributes["conveyor.task.type"] == "traced"
            assert span.attributes["conveyor.task.attempt"] == attempt
            assert span.attributes["conveyor.tenant"] == "default"
    assert executions[0].status_code == STATUS_ERROR
    assert executions[0].attributes["conveyor.task.outcome"] == "failed"
    assert executions[1].attributes["conveyor.task.outcome"] == "succeeded"
    assert executions[1].status_code != STATUS_ERROR
    assert sorted(h.parent_span_id for h in handlers) == sorted(e.span_id for e in executions)

    # The log lines of both processes carry the fields as keys of their own.
    worker_lines = json_lines(worker.log_path)
    sending = [e for e in worker_lines if e["message"].startswith("sending attempt")]
    assert [e["attempt"] for e in sending] == [1, 2]
    for entry in sending:
        assert {"task_id", "attempt", "queue", "type", "worker_id", "tenant", "epoch"} <= (
            entry.keys()
        )
        assert (entry["task_id"], entry["queue"], entry["type"]) == (task.id, "emails", "traced")
        assert entry["worker_id"] == "traced-worker" and entry["epoch"] >= 1
        assert entry["tenant"] == "default"
        assert entry["trace_id"] == submit.trace_id
    assert sending[0]["span_id"] in {h.span_id for h in handlers}
    (failed,) = [e for e in worker_lines if "failed" in e["message"] and "task_id" in e]
    assert failed["task_id"] == task.id and failed["attempt"] == 1
    coordinator_lines = json_lines(coordinator.log_path)
    (connected,) = [
        e for e in coordinator_lines if "worker traced-worker connected" in e["message"]
    ]
    assert (connected["worker_id"], connected["tenant"]) == ("traced-worker", "default")
    (leads,) = [e for e in coordinator_lines if " leads cluster " in e["message"]]
    assert leads["epoch"] >= 1
    seen = {key for e in worker_lines + coordinator_lines for key in e}
    assert set(FIELDS) <= seen, set(FIELDS) - seen


def _trace_of(traceparent: str | None) -> str:
    assert traceparent, "the task carries the submit span's context"
    return traceparent.split("-")[1]


def _by_attempt(spans: Any) -> list[ReceivedSpan]:
    return sorted(spans, key=lambda s: s.attributes["conveyor.task.attempt"])


async def test_without_an_endpoint_tracing_loads_nothing_and_records_nothing() -> None:
    done = await run([sys.executable, HOP, "disabled"], env=otel_env(None))
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report == {
        "enabled": [False, False, False, False],
        "span": False,
        "sdk": [],
        "interceptors": 0,
    }
