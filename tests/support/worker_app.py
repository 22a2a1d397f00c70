"""A worker application for the process-level tests: ``conveyor worker worker_app:worker``.

Every handler that completes appends ``<task id> <attempt>`` to the file named by
``CONVEYOR_TEST_LOG``, so a test can count side effects exactly; ``sleep`` also appends
``started <task id> <attempt>`` when it begins (``cluster.read_starts``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from opentelemetry import trace

from conveyor.worker import TaskContext, Worker

worker = Worker(
    os.environ.get("CONVEYOR_COORDINATOR", "127.0.0.1:50051"),
    concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "10")),
    grace_period=float(os.environ.get("CONVEYOR_TEST_GRACE", "10")),
    # Unset: the default id, unique per process.
    worker_id=os.environ.get("CONVEYOR_TEST_WORKER_ID") or None,
)


def _record(ctx: TaskContext, event: str = "") -> None:
    with open(os.environ["CONVEYOR_TEST_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{event} {ctx.task_id} {ctx.attempt}\n".lstrip())


@worker.task("hold-first-attempt")
async def hold_first_attempt(ctx: TaskContext, payload: Any) -> str:
    """The first attempt hangs (to be killed mid-task); later attempts finish at once."""
    if ctx.attempt == 1:
        await asyncio.sleep(3600)
    _record(ctx)
    return "done"


@worker.task("sleep")
async def sleep(ctx: TaskContext, payload: Any) -> str:
    _record(ctx, "started")
    await asyncio.sleep(float(payload))
    _record(ctx)
    return "slept"


@worker.task("block-loop")
async def block_loop(ctx: TaskContext, payload: Any) -> str:
    """Blocks the worker's event loop (as CPU work in an ``async def`` would) for about
    ``payload`` seconds, 0.4 s at a time, letting the loop run for 0.1 s in between (so
    heartbeats still go out)."""
    for _ in range(round(float(payload) / 0.5)):
        time.sleep(0.4)  # noqa: ASYNC251 (blocking the loop is the point)
        await asyncio.sleep(0.1)
    _record(ctx)
    return "blocked"


@worker.task("noop")
async def noop(ctx: TaskContext, payload: Any) -> str:
    """Finishes at once (the load of the distributed scenarios); still logs its effect."""
    _record(ctx)
    return "ok"


@worker.task("traced")
async def traced(ctx: TaskContext, payload: Any) -> str:
    """Attempt 1 fails, attempt 2 succeeds; each opens a span of its own through the
    global API (as application code would) and logs through ``ctx.logger``."""
    with trace.get_tracer("app").start_as_current_span("smtp"):
        ctx.logger.info("sending attempt %d", ctx.attempt)
    if ctx.attempt == 1:
        raise RuntimeError("the mail server said try again")
    _record(ctx)
    return "sent"


#: A worker without handlers: ``conveyor worker worker_app:idle`` must refuse to start.
idle = Worker(os.environ.get("CONVEYOR_COORDINATOR", "127.0.0.1:50051"))
