"""``conveyor bench-streams``: many worker streams on one coordinator.

A coordinator process (authentication on: a bootstrap key every stream presents), then
``processes`` processes of simulated worker streams (``bench/stream_worker.py``: the real
worker protocol, heartbeats at the interval Welcome gives, a result and a credit back for
every assignment), all told to start their Hellos at the same moment. Figures:

- connect_s: from the first Hello sent to the last Welcome received, over every process
  (wall clock, one machine); connected: streams welcomed within ``connect_timeout``;
  coordinator_cpu_per_connect_ms (and bench_cpu_per_connect_ms, the simulated side's):
  CPU spent during the connect phase per stream connected;
- coordinator_rss_mb (with the streams connected, idle), and per_stream_kb: its growth
  from before the streams, per stream; bench_rss_per_stream_kb: the simulated side's;
- coordinator_cpu_idle_pct: % of one core the coordinator spends with the streams
  connected and heartbeating, nothing to dispatch, over ``idle_seconds``;
- pickup_p50/p99_ms at ``rate`` probe tasks/s for ``seconds``: from the client's send
  time (in the payload) to a simulated worker reading its assignment; split at the start
  of the submit's flush (its ``create_time``): pickup_to_flush (the call, the wait for a
  flush) and pickup_after_flush (the commit, the hand-off, the write, the worker's read;
  each percentile of its own, so the two need not add up);
  coordinator_cpu_load_pct: % of one core meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import statistics
import sys
import time
from asyncio.subprocess import PIPE, Process
from dataclasses import dataclass
from typing import Any

import asyncpg
import psutil

from conveyor.bench import cpu
from conveyor.bench.runner import (
    _free_port,
    _percentile,
    _postgres,
    _say,
    _stop,
    _wait_done,
    _wait_serving,
)
from conveyor.bench.stream_worker import QUEUE, TASK_TYPE, raise_fd_limit
from conveyor.client import AsyncClient
from conveyor.coordinator.tenancy import keys as api_keys

STREAMS_PER_PROCESS = 2500
"""The default split: about this many simulated streams per process."""


@dataclass(frozen=True)
class StreamsConfig:
    streams: int = 10_000
    processes: int = 0
    """Processes of simulated streams; 0: one per STREAMS_PER_PROCESS, at least two."""
    per_connection: int = 1
    """Streams sharing one HTTP/2 connection (1: each its own, as separate workers)."""
    rate: float = 50.0
    seconds: float = 10.0
    idle_seconds: float = 10.0
    connect_timeout: float = 60.0
    dsn: str | None = None

    @property
    def process_count(self) -> int:
        if self.processes:
            return min(self.processes, self.streams)
        return min(self.streams, max(2, math.ceil(self.streams / STREAMS_PER_PROCESS)))


async def _line(proc: Process, prefix: str, within: float) -> str:
    """The rest of the next stdout line of ``proc`` that starts with ``prefix``."""
    assert proc.stdout is not None
    async with asyncio.timeout(within):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise RuntimeError(f"a stream process exited (code {await proc.wait()})")
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line[len(prefix) :].strip()


def _cpu_pct(proc: psutil.Process, seconds_before: float, wall_before: float) -> float:
    return round(
        100.0 * (cpu.cpu_seconds(proc) - seconds_before) / (time.monotonic() - wall_before), 1
    )


def _rss_mb(procs: list[psutil.Process]) -> float:
    return sum(p.memory_info().rss for p in procs) / (1 << 20)


async def run(cfg: StreamsConfig) -> dict[str, Any]:
    """Runs the benchmark and returns its figures (and reports them on stderr)."""
    raise_fd_limit()
    procs: list[Process] = []
    load_before = os.getloadavg()
    async with _postgres(cfg.dsn) as dsn:
        address = f"127.0.0.1:{_free_port()}"
        key = api_keys.generate()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CONVEYOR_BOOTSTRAP_KEY"] = env["CONVEYOR_API_KEY"] = key
        try:
            _say(f"starting the coordinator on {address} (authentication on) …")
            coordinator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor.cli.main", "--log-level", "warning",
                "coordinator", "--dsn", dsn, "--listen", address, env=env,
            )  # fmt: skip
            procs.append(coordinator)
            await _wait_serving(address, coordinator)
            db = await asyncpg.connect(dsn)
            try:
                async with AsyncClient(address, timeout=60.0, api_key=key) as client:
                    figures = await _measure(cfg, client, db, address, env, procs)
            finally:
                await db.close()
        finally:
            streams = procs[1:]
            for proc in streams:
                if proc.stdin is not None and proc.returncode is None:
                    proc.stdin.close()
            await _stop(streams)
            await _stop(procs[:1])
    figures["load_average"] = [round(v, 2) for v in (*load_before, *os.getloadavg())]
    _report(cfg, figures)
    return figures


async def _measure(
    cfg: StreamsConfig,
    client: AsyncClient,
    db: asyncpg.Connection,
    address: str,
    env: dict[str, str],
    procs: list[Process],
) -> dict[str, Any]:
    coordinator = psutil.Process(procs[0].pid)
    # One task through the coordinator first, so its set-up is not counted.
    await client.submit("warm", b"", queue="bench-streams-warm", raw=True)
    rss_before = _rss_mb([coordinator])
    count = cfg.process_count
    _say(f"opening {cfg.streams} worker streams from {count} processes "
         f"({cfg.per_connection} stream(s) per connection) …")  # fmt: skip
    for i in range(count):
        share = cfg.streams // count + (1 if i < cfg.streams % count else 0)
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "conveyor.bench.stream_worker",
                "--coordinator",
                address,
                "--streams",
                str(share),
                "--prefix",
                f"sim{i}",
                "--per-connection",
                str(cfg.per_connection),
                "--connect-timeout",
                str(cfg.connect_timeout),
                stdin=PIPE,
                stdout=PIPE,
                env=env,
            )
        )
    streamers = procs[1:]
    for proc in streamers:
        await _line(proc, "READY", 120.0)
    sims = [psutil.Process(p.pid) for p in streamers]
    cpu_before = cpu.cpu_seconds(coordinator), sum(cpu.cpu_seconds(p) for p in sims)
    for proc in streamers:
        assert proc.stdin is not None
        proc.stdin.write(b"GO\n")
        await proc.stdin.drain()
    reports = [
        json.loads(await _line(proc, "CONNECTED", cfg.connect_timeout + 60.0)) for proc in streamers
    ]
    connected = sum(r["welcomed"] for r in reports)
    connect_cpu = (
        cpu.cpu_seconds(coordinator) - cpu_before[0],
        sum(cpu.cpu_seconds(p) for p in sims) - cpu_before[1],
    )
    errors: dict[str, int] = {}
    for report in reports:
        for name, n in report["errors"].items():
            errors[name] = errors.get(name, 0) + n
    first = min(r["first_hello"] for r in reports if r["first_hello"] is not None)
    welcomes = [r["last_welcome"] for r in reports if r["last_welcome"] is not None]
    connect_s = round(max(welcomes) - first, 3) if welcomes else None
    _say(f"{connected} of {cfg.streams} streams connected in {connect_s} s; "
         f"idle for {cfg.idle_seconds:g} s …")  # fmt: skip

    # Idle: the streams heartbeat, nothing is submitted.
    before, wall = cpu.cpu_seconds(coordinator), time.monotonic()
    await asyncio.sleep(cfg.idle_seconds)  # the measured window itself
    idle_pct = _cpu_pct(coordinator, before, wall)
    rss = _rss_mb([coordinator])
    bench_rss = _rss_mb(sims)

    # Probe load: a steady rate of lone submits.
    tasks = max(1, int(cfg.rate * cfg.seconds))
    _say(f"pickup latency: {tasks} tasks at {cfg.rate:g}/s …")
    interval = 1.0 / cfg.rate
    before, wall = cpu.cpu_seconds(coordinator), time.monotonic()
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
        await client.submit(TASK_TYPE, repr(time.time()).encode(), queue=QUEUE, raw=True)

    await asyncio.gather(*(one(i) for i in range(tasks)))
    load_pct = _cpu_pct(coordinator, before, wall)
    await _wait_done(db, TASK_TYPE, tasks, within=60.0, queue=QUEUE)
    # The payload is the send time, the result the pickup latency, create_time the start
    # of the submit's flush (the coordinator's clock: one machine).
    rows = await db.fetch(
        "SELECT payload, result, extract(epoch FROM create_time)::float8 AS flushed"
        " FROM tasks WHERE type = $1 AND queue = $2 AND state = 4",
        TASK_TYPE,
        QUEUE,
    )
    rows = [r for r in rows if r["result"]]
    latencies = [float(r["result"]) for r in rows]
    to_flush = [(r["flushed"] - float(r["payload"])) * 1000.0 for r in rows]
    after_flush = [late - early for late, early in zip(latencies, to_flush, strict=True)]
    return {
        "streams": cfg.streams,
        "processes": count,
        "streams_per_connection": cfg.per_connection,
        "connected": connected,
        "connect_s": connect_s,
        "connect_errors": errors,
        "coordinator_cpu_per_connect_ms": round(connect_cpu[0] * 1000 / max(1, connected), 2),
        "bench_cpu_per_connect_ms": round(connect_cpu[1] * 1000 / max(1, connected), 2),
        "coordinator_rss_mb": round(rss, 1),
        "coordinator_rss_before_mb": round(rss_before, 1),
        "per_stream_kb": round((rss - rss_before) * 1024 / max(1, connected), 1),
        "bench_rss_per_stream_kb": round(bench_rss * 1024 / max(1, connected), 1),
        "coordinator_cpu_idle_pct": idle_pct,
        "coordinator_cpu_load_pct": load_pct,
        "rate": cfg.rate,
        "pickup_samples": len(latencies),
        "pickup_p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "pickup_p99_ms": round(_percentile(latencies, 99), 2) if latencies else None,
        "pickup_to_flush_p50_ms": _median(to_flush),
        "pickup_to_flush_p99_ms": _p99(to_flush),
        "pickup_after_flush_p50_ms": _median(after_flush),
        "pickup_after_flush_p99_ms": _p99(after_flush),
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _p99(values: list[float]) -> float | None:
    return round(_percentile(values, 99), 2) if values else None


def _report(cfg: StreamsConfig, f: dict[str, Any]) -> None:
    load = f["load_average"]
    _say(
        f"""
Conveyor worker streams ({platform.machine()}, {os.cpu_count()} CPUs, Python \
{platform.python_version()}, authentication on, load {load[0]:.2f} before / {load[3]:.2f} after)
  connected             {f["connected"]:,} of {f["streams"]:,} in {f["connect_s"]} s \
(first Hello to last Welcome; {f["processes"]} processes, {f["streams_per_connection"]} \
stream(s) per connection; errors {f["connect_errors"] or "none"})
  CPU per connect       coordinator {f["coordinator_cpu_per_connect_ms"]} ms, simulated side \
{f["bench_cpu_per_connect_ms"]} ms (during the connect phase, per stream connected)
  pickup latency        p50 {f["pickup_p50_ms"]} ms   p99 {f["pickup_p99_ms"]} ms   \
({f["pickup_samples"]} tasks at {cfg.rate:g}/s)
    of which            to the submit's flush p50 {f["pickup_to_flush_p50_ms"]} ms   p99 \
{f["pickup_to_flush_p99_ms"]} ms; from its flush to the worker p50 \
{f["pickup_after_flush_p50_ms"]} ms   p99 {f["pickup_after_flush_p99_ms"]} ms
  coordinator CPU       {f["coordinator_cpu_idle_pct"]} % of a core idle, \
{f["coordinator_cpu_load_pct"]} % under the probe load
  coordinator RSS       {f["coordinator_rss_mb"]} MiB ({f["coordinator_rss_before_mb"]} before \
the streams: {f["per_stream_kb"]} KiB per stream)
  simulated side        {f["bench_rss_per_stream_kb"]} KiB per stream
"""
    )
