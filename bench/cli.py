"""The ``conveyor bench`` sub-command."""

from __future__ import annotations

import argparse
import asyncio
import json

from conveyor.bench.runner import BenchConfig, run


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="measure throughput and pickup latency (coordinator and workers as processes)",
    )
    p.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per throughput run")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=int, default=500, help="slots per worker")
    p.add_argument("--batch", type=int, default=500, help="tasks per SubmitTasks call")
    p.add_argument("--submitters", type=int, default=4, help="concurrent submit calls")
    p.add_argument("--latency-rate", type=float, default=100.0, help="tasks/s when timing pickup")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--dsn", help="PostgreSQL to use (its database must be empty or Conveyor's)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    config = BenchConfig(
        tasks=args.tasks,
        workers=args.workers,
        concurrency=args.concurrency,
        batch=args.batch,
        submitters=args.submitters,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        dsn=args.dsn,
    )
    figures = asyncio.run(run(config))
    if args.json:
        print(json.dumps(figures))
    return 0
