"""Measures what one ``/metrics`` scrape of the coordinator (or, ``--worker``, of the
worker) costs in its CPU.

    .venv/bin/python tests/support/scrape_cost.py [--scrapes 200] [--load] [--worker]

Starts PostgreSQL (embedded), a coordinator and a worker with metrics on, runs tasks
through them so the series exist, then scrapes the coordinator ``--scrapes`` times one
after another and divides the coordinator's CPU (user + system, psutil) by the scrapes,
less what the coordinator spends idle over as long. With ``--load`` the scrapes run while
a client keeps submitting (the difference is then noisier, as the load's own CPU varies).
A script, not a timed test: timings on a shared machine are not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request

import psutil

from conveyor.bench import runner
from conveyor.bench.worker import QUEUE
from conveyor.client import AsyncClient, TaskSpec


def _scrape(url: str, times: int) -> int:
    size = 0
    for _ in range(times):
        with urllib.request.urlopen(url, timeout=10) as response:
            size = len(response.read())
    return size


async def main(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with runner._postgres(None) as dsn:
        address = f"127.0.0.1:{runner._free_port()}"
        listen = f"127.0.0.1:{runner._free_port()}"
        url = f"http://{listen}/metrics"
        coordinator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor.cli.main", "--log-level", "warning", "coordinator",
            "--dsn", dsn, "--listen", address, "--insecure", "--metrics-listen", listen, env=env,
        )  # fmt: skip
        procs = [coordinator]
        try:
            await runner._wait_serving(address, coordinator)
            worker_listen = f"127.0.0.1:{runner._free_port()}"
            worker = await runner.start_worker(address, 200, env, "--metrics-listen", worker_listen)
            procs.append(worker)
            target = worker if args.worker else coordinator
            if args.worker:
                url = f"http://{worker_listen}/metrics"
            proc = psutil.Process(target.pid)
            print(f"{'worker' if args.worker else 'coordinator'} pid {target.pid}", flush=True)
            async with AsyncClient(address, timeout=60.0) as client:
                specs = [TaskSpec(type="noop", queue=QUEUE, payload=b"", raw=True)] * 500
                for _ in range(10):
                    await client.submit_many(specs)
                warm = await client.submit("noop", b"", queue=QUEUE, raw=True)
                await client.wait(warm.id, timeout=60)
                await asyncio.to_thread(_scrape, url, 5)

                stop = asyncio.Event()

                async def load() -> None:
                    while not stop.is_set():
                        await client.submit_many(specs[:50])
                        await asyncio.sleep(0.02)

                loader = asyncio.create_task(load()) if args.load else None

                def cpu() -> float:
                    t = proc.cpu_times()
                    return float(t.user + t.system)

                figures = []
                for _ in range(args.rounds):
                    c0, t0 = cpu(), time.perf_counter()
                    size = await asyncio.to_thread(_scrape, url, args.scrapes)
                    c1, t1 = cpu(), time.perf_counter()
                    await asyncio.sleep(t1 - t0)  # as long, without scrapes
                    c2 = cpu()
                    per_scrape = ((c1 - c0) - (c2 - c1)) / args.scrapes * 1000
                    figures.append(per_scrape)
                    print(
                        f"{args.scrapes} scrapes in {t1 - t0:.2f} s: {per_scrape:.2f} ms of "
                        f"{'worker' if args.worker else 'coordinator'} CPU each "
                        f"({size:,} bytes; idle over as long "
                        f"{(c2 - c1) * 1000:.0f} ms)",
                        flush=True,
                    )
                if loader is not None:
                    stop.set()
                    await loader
                figures.sort()
                print(f"median {figures[len(figures) // 2]:.2f} ms per scrape", flush=True)
        finally:
            await runner._stop(procs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--worker", action="store_true", help="scrape the worker instead")
    asyncio.run(main(parser.parse_args()))
