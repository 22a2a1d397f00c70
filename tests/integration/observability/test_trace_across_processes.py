"""One trace from submit to execution across three real processes, exported over real
OTLP/gRPC to a receiver started by the test.

The test process is the client (submit span); a second process is the coordinator's half
(a dispatch span per attempt, child of the stored traceparent); a third is the worker's
(an execution span per attempt, child of its dispatch span, with a handler's own span
inside). Attempt 1 fails, attempt 2 succeeds: both are in the one trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import processes
from otlp_receiver import OtlpReceiver, ReceivedSpan
from testsupport import SUPPORT_DIR, eventually

from conveyor.observability.tracing import (
    ATTRIBUTES,
    SERVICE_CLIENT,
    SERVICE_COORDINATOR,
    SERVICE_WORKER,
    Tracing,
)

HOP = str(SUPPORT_DIR / "trace_hop.py")
TASK_ID = "0190f0a0-0000-7000-8000-000000000001"
SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 4, 5
STATUS_ERROR = 2


async def run(env: dict[str, str], *args: str) -> str:
    done = await processes.run([sys.executable, HOP, *args], env=env)
    assert done.code == 0, done.err
    return done.out


def otel_env(endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    return env


async def test_submit_dispatch_and_execution_form_one_trace() -> None:
    async with OtlpReceiver() as receiver:
        env = otel_env(receiver.endpoint)
        client = Tracing.from_env(SERVICE_CLIENT, endpoint=receiver.endpoint)
        with client.submit_span("send", "emails") as traceparent:
            pass  # the request carrying `traceparent` would be sent here
        await asyncio.to_thread(client.shutdown)
        assert traceparent.startswith("00-")

        dispatched = (await run(env, "dispatch", traceparent, TASK_ID, "1", "2")).split()
        assert len(dispatched) == 2 and traceparent not in dispatched
        await run(
            env,
            "execute",
            TASK_ID,
            f"{dispatched[0]}:1:failed",
            f"{dispatched[1]}:2:succeeded",
        )

        await eventually(lambda: _arrived(receiver, 7), timeout=30)
        spans = list(receiver.spans)

    (submit,) = [s for s in spans if s.name == "submit send"]
    dispatches = sorted(
        (s for s in spans if s.name == "dispatch send"), key=lambda s: s.attributes[ATTRIBUTES[3]]
    )
    executions = sorted(
        (s for s in spans if s.name == "execute send"), key=lambda s: s.attributes[ATTRIBUTES[3]]
    )
    handlers = [s for s in spans if s.name == "smtp"]
    assert {s.trace_id for s in spans} == {submit.trace_id}, "all in one trace"
    assert submit.parent_span_id == "" and submit.service == SERVICE_CLIENT
    assert submit.kind == SPAN_KIND_PRODUCER
    for attempt, (dispatch, execution) in enumerate(zip(dispatches, executions, strict=True), 1):
        assert dispatch.service == SERVICE_COORDINATOR
        assert execution.service == SERVICE_WORKER
        assert dispatch.parent_span_id == submit.span_id
        assert execution.parent_span_id == dispatch.span_id
        assert execution.kind == SPAN_KIND_CONSUMER
        for span in (dispatch, execution):
            assert span.attributes["conveyor.task.id"] == TASK_ID
            assert span.attributes["conveyor.queue"] == "emails"
            assert span.attributes["conveyor.task.type"] == "send"
            assert span.attributes["conveyor.task.attempt"] == attempt
            assert span.attributes["conveyor.tenant"] == "default"
    assert executions[0].status_code == STATUS_ERROR
    assert executions[0].attributes["conveyor.task.outcome"] == "failed"
    assert executions[1].status_code != STATUS_ERROR
    assert sorted(h.parent_span_id for h in handlers) == sorted(e.span_id for e in executions)


async def _arrived(receiver: OtlpReceiver, count: int) -> list[ReceivedSpan] | None:
    return receiver.spans if len(receiver.spans) >= count else None


async def test_without_an_endpoint_tracing_loads_nothing_and_records_nothing() -> None:
    report = json.loads(await run(otel_env(None), "disabled"))
    assert report == {"enabled": False, "span": False, "sdk": []}
