"""``conveyor bench-deps``: fan-out and fan-in of many tasks, against the same tasks
without dependencies.

Starts PostgreSQL (embedded, durable) and a coordinator process, then runs three
scenarios of ``--tasks`` no-op tasks each:

- ``plain``: the tasks alone;
- ``fan_out``: one root task, and the tasks each ``after`` it;
- ``fan_in``: the tasks, and one sink ``after`` all of them.

Each scenario is submitted with no worker connected (the submit is timed), then worker
processes start and drain it. The processing time is read from the database: from the
first lease of the scenario's tasks to the last finish, so process start-up is not in
it. For fan-out that is the root's run, the release of every dependent in the
transaction that finishes the root, and their runs; for fan-in, every finishing
statement also counts down the sink, which runs last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from asyncio.subprocess import Process
from typing import Any

import asyncpg

from conveyor.bench.runner import (
    _free_port,
    _postgres,
    _say,
    _stop,
    _wait_serving,
    start_worker,
)
from conveyor.bench.worker import QUEUE
from conveyor.client import AsyncClient, Task, TaskSpec

SCENARIOS = ("plain", "fan_out", "fan_in")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with _postgres(args.dsn) as dsn:
        address = f"127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cli = [sys.executable, "-m", "conveyor.cli.main", "--log-level", "warning"]
        _say(f"starting the coordinator on {address} …")
        coordinator = await asyncio.create_subprocess_exec(
            *cli, "coordinator", "--dsn", dsn, "--listen", address, "--insecure", env=env
        )
        try:
            await _wait_serving(address, coordinator)
            db = await asyncpg.connect(dsn)
            try:
                async with AsyncClient(address, timeout=120.0) as client:
                    figures: dict[str, Any] = {"tasks": args.tasks, "workers": args.workers}
                    for scenario in SCENARIOS:
                        figures[scenario] = await _scenario(
                            scenario, args, client, db, address, env
                        )
            finally:
                await db.close()
        finally:
            await _stop([coordinator])
    plain = figures["plain"]
    for scenario in SCENARIOS[1:]:
        for what in ("submit_s", "processing_s", "total_s"):
            figures[scenario][f"{what[:-2]}_vs_plain"] = round(
                figures[scenario][what] / plain[what], 2
            )
    _report(figures)
    return figures


def _specs(args: argparse.Namespace, scenario: str, **extra: Any) -> list[TaskSpec]:
    return [
        TaskSpec(
            type="noop", queue=QUEUE, payload=b"", raw=True, labels={"bench": scenario}, **extra
        )
    ] * args.tasks


async def _submit(
    client: AsyncClient, specs: list[TaskSpec], args: argparse.Namespace
) -> list[Task]:
    chunks = [specs[i : i + args.batch] for i in range(0, len(specs), args.batch)]
    done: list[list[Task]] = [[] for _ in chunks]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(chunks)):
        queue.put_nowait(i)

    async def submitter() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            done[i] = await client.submit_many(chunks[i])

    await asyncio.gather(*(submitter() for _ in range(args.submitters)))
    return [t for chunk in done for t in chunk]


async def _scenario(
    scenario: str,
    args: argparse.Namespace,
    client: AsyncClient,
    db: asyncpg.Connection,
    address: str,
    env: dict[str, str],
) -> dict[str, float]:
    _say(f"{scenario}: submitting {args.tasks} tasks …")
    label = {"bench": scenario}
    started = time.perf_counter()
    if scenario == "plain":
        await _submit(client, _specs(args, scenario), args)
    elif scenario == "fan_out":
        root = await client.submit("noop", b"", queue=QUEUE, raw=True, labels=label)
        await _submit(client, _specs(args, scenario, after=[root.id]), args)
    else:
        tasks = await _submit(client, _specs(args, scenario), args)
        await client.submit("noop", b"", queue=QUEUE, raw=True, labels=label, after=tasks)
    submit_s = time.perf_counter() - started
    expected = args.tasks + (0 if scenario == "plain" else 1)

    _say(f"{scenario}: draining with {args.workers} worker processes …")
    workers: list[Process] = [
        await start_worker(address, args.concurrency, env) for _ in range(args.workers)
    ]
    try:
        deadline = time.monotonic() + max(300.0, args.tasks / 50)
        while True:
            done = await db.fetchval(
                "SELECT count(*) FROM tasks WHERE labels->>'bench' = $1 AND state = 4", scenario
            )
            if done >= expected:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{scenario}: only {done} of {expected} tasks finished")
            await asyncio.sleep(0.05)
    finally:
        await _stop(workers)
    span = await db.fetchrow(
        """
        SELECT extract(epoch FROM max(t.finish_time) - min(a.start_time)) AS seconds
        FROM tasks t JOIN task_attempts a ON a.task_id = t.id
        WHERE t.labels->>'bench' = $1
        """,
        scenario,
    )
    processing_s = float(span["seconds"])
    return {
        "submit_s": round(submit_s, 3),
        "processing_s": round(processing_s, 3),
        "total_s": round(submit_s + processing_s, 3),
    }


def _report(f: dict[str, Any]) -> None:
    lines = [
        f"Conveyor dependency benchmark ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}): {f['tasks']:,} no-op tasks, "
        f"{f['workers']} workers",
        f"  {'':10} {'submit s':>10} {'processing s':>13} {'total s':>9}   vs plain "
        "(submit / processing / total)",
    ]
    for name in SCENARIOS:
        s = f[name]
        ratios = (
            f"{s['submit_vs_plain']}x / {s['processing_vs_plain']}x / {s['total_vs_plain']}x"
            if name != "plain"
            else ""
        )
        lines.append(
            f"  {name:10} {s['submit_s']:>10.2f} {s['processing_s']:>13.2f} "
            f"{s['total_s']:>9.2f}   {ratios}"
        )
    _say("\n" + "\n".join(lines) + "\n")
