"""Demo task types, served by ``conveyor worker --demo`` and ``conveyor dev``.

* ``echo`` (raw): the result is the payload bytes.
* ``sleep``: the payload is a JSON number of seconds; sleeps that long (cancellable) and
  returns ``{"slept": n}``.
* ``fail``: always fails with a retryable "demo failure".

``conveyor worker conveyor.worker.demo`` loads the module-level :data:`worker` (default
coordinator address); the CLI builds its own with :func:`create_worker` to pass options.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from conveyor.worker._context import TaskContext
from conveyor.worker._errors import NonRetryableError
from conveyor.worker._worker import Worker

__all__ = ["DEMO_TASK_TYPES", "DemoFailure", "create_worker", "register_demo_tasks", "worker"]

DEMO_TASK_TYPES = ("echo", "sleep", "fail")


class DemoFailure(RuntimeError):
    """What the ``fail`` task raises (retryable)."""


def register_demo_tasks(worker: Worker) -> Worker:
    """Register the demo task types on ``worker`` and return it."""

    @worker.task("echo", raw=True)
    async def echo(ctx: TaskContext, payload: bytes) -> bytes:
        return payload

    @worker.task("sleep")
    async def sleep(ctx: TaskContext, payload: Any) -> dict[str, float]:
        # bool is an int subclass, but `true` seconds is surely a mistake.
        if isinstance(payload, bool) or not isinstance(payload, int | float):
            raise NonRetryableError(
                f"sleep expects a JSON number of seconds, got {type(payload).__name__}"
            )
        if not math.isfinite(payload) or payload < 0:
            raise NonRetryableError(f"sleep expects a finite, non-negative number, got {payload}")
        # asyncio.sleep is cancelled with the handler (timeout, CancelTasks, shutdown).
        await asyncio.sleep(payload)
        return {"slept": payload}

    @worker.task("fail")
    async def fail(ctx: TaskContext, payload: Any) -> None:
        raise DemoFailure("demo failure")

    return worker


def create_worker(coordinators: str | Sequence[str] = "127.0.0.1:50051", **options: Any) -> Worker:
    """A new :class:`Worker` with the demo task types; ``options`` go to :class:`Worker`."""
    return register_demo_tasks(Worker(coordinators, **options))


#: A demo worker for ``conveyor worker conveyor.worker.demo`` (coordinator at the default
#: address). Creating it does no I/O.
worker = create_worker()
