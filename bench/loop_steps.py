"""How long a coordinator's event loop runs without yielding while large submits come in:
``python -m conveyor.bench.loop_steps [--seconds 10] [--batch 500] [--calls-per-second 2]``.

A coordinator (in this process, authentication off, an embedded PostgreSQL) takes
SubmitTasks batches from a client in another process; every step of its event loop (one
callback: a task running until its next ``await``) is timed in CPU time of the loop's
thread (``time.thread_time``), which other processes on a shared machine do not inflate
the way they inflate wall time. A long step is a stretch in which no other call (another
tenant's lone submit, a dispatch round) can run. Prints one JSON line.

The file depends only on the coordinator's public entry points, so the same file can be
run with the Python of another checkout (an A/B of the version before a change).
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor.coordinator import Coordinator
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.embedded import EmbeddedPostgres

_CLIENT = r"""
import asyncio, sys, time, grpc
from conveyor.v1 import task_service_pb2 as T, task_service_pb2_grpc as G
async def main():
    address, seconds = sys.argv[1], float(sys.argv[2])
    batch, rate = int(sys.argv[3]), float(sys.argv[4])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = G.TaskServiceStub(channel)
        task = T.SubmitTaskRequest(type="bench.noop", queue="bench", payload=b'{"i": 1}')
        request = T.SubmitTasksRequest(tasks=[task] * batch)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            await stub.SubmitTasks(request, timeout=30)
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - start)))
asyncio.run(main())
"""


def _timing_steps(steps: list[float]) -> Callable[[], None]:
    """Times every event-loop step into ``steps`` (ms of CPU); returns the undo."""
    handle = asyncio.events.Handle
    original: Callable[[Any], None] = handle._run

    def timed(self: Any) -> None:
        start = time.thread_time()
        original(self)
        steps.append((time.thread_time() - start) * 1000)

    handle._run = timed  # type: ignore[method-assign]

    def undo() -> None:
        handle._run = original  # type: ignore[method-assign,assignment]

    return undo


def _at(values: list[float], share: float) -> float:
    return round(values[min(len(values) - 1, int(len(values) * share))], 2)


async def run(seconds: float, batch: int, rate: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="conveyor-loop-steps-"))
    server = EmbeddedPostgres(folder / "pg", durable=True)
    dsn = await asyncio.to_thread(server.start)
    try:
        coordinator = Coordinator(
            CoordinatorConfig(dsn=dsn, listen="127.0.0.1:0", authentication=False)
        )
        await coordinator.start()
        steps: list[float] = []
        undo = _timing_steps(steps)
        try:
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CLIENT,
                coordinator.address,
                str(seconds),
                str(batch),
                str(rate),
            )
            await asyncio.wait_for(client.wait(), seconds + 60)
        finally:
            undo()
        await coordinator.stop(grace=1.0)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)
    steps.sort()
    return {
        "steps": len(steps),
        "client_exit": client.returncode,
        "cpu_ms_p99": _at(steps, 0.99),
        "cpu_ms_p999": _at(steps, 0.999),
        "cpu_ms_max": round(steps[-1], 2) if steps else 0.0,
        "longest_5": [round(s, 1) for s in steps[-5:]],
        "over_5ms": sum(s > 5 for s in steps),
        "over_10ms": sum(s > 10 for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--calls-per-second", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds, args.batch, args.calls_per_second))))


if __name__ == "__main__":
    main()
