"""The benchmark's worker process: ``python -m conveyor.bench.worker --coordinator ADDR``.

Two task types: ``noop`` (raw, does nothing; what throughput is measured with) and
``probe`` (raw; the payload is the submitter's wall-clock send time, the result is the
pickup latency in milliseconds, for latency measurements across processes).
"""

from __future__ import annotations

import argparse
import logging
import time

from conveyor.worker import TaskContext, Worker

QUEUE = "bench"


def build(coordinator: str, concurrency: int, metrics_listen: str | None = None) -> Worker:
    worker = Worker(
        coordinator,
        queues=[QUEUE],
        concurrency=concurrency,
        grace_period=5.0,
        metrics_listen=metrics_listen,
    )

    @worker.task("noop", raw=True)
    async def noop(ctx: TaskContext, payload: bytes) -> bytes:
        return b""

    @worker.task("probe", raw=True)
    async def probe(ctx: TaskContext, payload: bytes) -> bytes:
        picked = time.time()
        return f"{(picked - float(payload)) * 1000.0:.3f}".encode()

    return worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--metrics-listen", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    build(args.coordinator, args.concurrency, args.metrics_listen).run_sync()


if __name__ == "__main__":
    main()
