"""Runs the benchmark: PostgreSQL, a coordinator process, worker processes, a client.

Figures (all from timestamps, none from timed sleeps):
- submit_per_s: tasks committed per second by batched SubmitTasks calls (nobody consumes).
- e2e_per_s: no-op tasks per second from the first submit to the last result committed,
  read from the database (first create_time to last finish_time).
- pickup_p50/p95/p99/max_ms: at a light steady rate, from the client's send time to the
  handler's start, measured by a probe task across processes on one clock; and
  pickup_histogram_ms, the same probes counted in buckets (``PICKUP_BUCKETS_MS``).
- submit_latency_p50/p99_ms: the same probes' submits, from the call to its answer (the
  client library included).
- cpu_per_task_us: CPU (user + system, psutil) spent during the end-to-end phase divided
  by its tasks, by process group: coordinator, workers, client (this process), postgres
  (the server and all its backends, when it runs on this machine), and total.
- cpu_per_probe_us: the same during the pickup phase, divided by its probes (what a
  lone submit's pickup costs each process, the phase's idle work included).
- worker_idle_rss_mb: resident memory of the largest worker process when idle (started,
  connected and warmed up by one task, before the end-to-end phase).

With ``metrics`` the coordinator and the workers serve Prometheus metrics and are scraped
every ``scrape_interval`` throughout (1 s by default, harsher than a usual 15 s), so the
figures include what recording and serving metrics cost; compare with a run without.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.bench import cpu
from conveyor.bench.worker import QUEUE
from conveyor.client import AsyncClient, TaskSpec
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.transport._gc import freeze_startup_heap
from conveyor.v1 import task_pb2

STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class BenchConfig:
    tasks: int = 20_000
    workers: int = 2
    concurrency: int = 500
    batch: int = 500
    submitters: int = 4
    latency_rate: float = 100.0
    latency_seconds: float = 10.0
    dsn: str | None = None
    metrics: bool = False
    scrape_interval: float = 1.0
    """Seconds between scrapes of every metrics endpoint in a run with metrics."""
    insecure: bool = False
    """Authentication off (to compare): by default the coordinator requires a key, as in
    production, and every process of the benchmark sends one."""
    rate_limit: float | None = None
    """A rate limit on the end-to-end queue (tasks/s), or None: the limited claim's cost."""
    concurrency_keys: int = 0
    """End-to-end and pickup tasks spread over this many concurrency keys, none binding
    (0: no keys): the keyed claim's cost."""

    def flow(self, i: int) -> dict[str, Any]:
        """The flow-control fields of the ``i``-th task of a phase."""
        if not self.concurrency_keys:
            return {}
        return {
            "concurrency_key": f"k{i % self.concurrency_keys}",
            "concurrency_limit": self.workers * self.concurrency,
        }


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def _postgres(dsn: str | None) -> AsyncIterator[str]:
    if dsn:
        yield dsn
        return
    from conveyor.embedded import EmbeddedPostgres

    folder = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    # Durable on purpose: every state change is fsynced, as in production.
    server = EmbeddedPostgres(folder / "pg", durable=True)
    try:
        _say(f"starting PostgreSQL (durable) in {folder} …")
        yield await asyncio.to_thread(server.start)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)


async def _wait_serving(address: str, proc: Process) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the coordinator exited with code {proc.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the coordinator did not serve within {STARTUP_TIMEOUT:.0f}s")


async def start_worker(address: str, concurrency: int, env: dict[str, str], *extra: str) -> Process:
    """A worker process of no-op handlers (``bench/worker.py``)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor.bench.worker",
        "--coordinator",
        address,
        "--concurrency",
        str(concurrency),
        *extra,
        env=env,
    )


async def _stop(procs: list[Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class _Scraper:
    """Scrapes metrics endpoints every ``interval`` seconds, as Prometheus would, and once
    more each when stopped (so a short run still reads every endpoint)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.urls: list[str] = []
        self.scrapes = 0
        self.scraped: set[str] = set()
        """The endpoints read at least once."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            await self._pass()

    async def _run(self) -> None:
        while True:
            await self._pass()
            await asyncio.sleep(self.interval)

    async def _pass(self) -> None:
        for url in list(self.urls):
            try:
                await _fetch(url)
            except (OSError, TimeoutError):
                continue  # a worker still starting; the next pass reads it
            self.scrapes += 1
            self.scraped.add(url)


async def _fetch(url: str) -> None:
    """One GET of a metrics page, on the loop. Not urllib in a thread: that thread held
    this process's GIL for a millisecond or two per page, in slices of up to the switch
    interval (5 ms), which the pickup latency measured here then counted against the
    metrics (Prometheus scrapes from a process of its own)."""
    parts = urllib.parse.urlsplit(url)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            request = f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            response = await reader.read()  # HTTP/1.0: the server closes when done
        finally:
            writer.close()
    if not response.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        raise OSError(f"{url} answered {response[:40]!r}")


def _metrics_args(cfg: BenchConfig, scraper: _Scraper) -> list[str]:
    """``--metrics-listen`` on a free port (its URL added to the scraper), or nothing."""
    if not cfg.metrics:
        return []
    listen = f"127.0.0.1:{_free_port()}"
    scraper.urls.append(f"http://{listen}/metrics")
    return ["--metrics-listen", listen]


async def _submit_all(client: AsyncClient, specs: list[TaskSpec], cfg: BenchConfig) -> None:
    chunks = [specs[i : i + cfg.batch] for i in range(0, len(specs), cfg.batch)]
    queue: asyncio.Queue[list[TaskSpec]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def submitter() -> None:
        while not queue.empty():
            await client.submit_many(queue.get_nowait())

    await asyncio.gather(*(submitter() for _ in range(cfg.submitters)))


# Whether a task of type $1 in queue $2 is unfinished (PENDING, SCHEDULED, RUNNING,
# BLOCKED): each state by its partial index, stopping at the first such task. (The submit
# phase's tasks, never run, wait in another queue.)
_UNFINISHED = "SELECT " + " OR ".join(
    f"EXISTS (SELECT FROM tasks WHERE state = {state} AND type = $1 AND queue = $2)"
    for state in (
        task_pb2.TASK_STATE_PENDING,
        task_pb2.TASK_STATE_SCHEDULED,
        task_pb2.TASK_STATE_RUNNING,
        task_pb2.TASK_STATE_BLOCKED,
    )
)
_SUCCEEDED = (
    "SELECT count(*) FROM tasks WHERE type = $1 AND queue = $2"
    f" AND state = {task_pb2.TASK_STATE_SUCCEEDED}"
)


async def _wait_done(
    db: asyncpg.Connection, type_: str, count: int, within: float, *, queue: str = QUEUE
) -> None:
    """Waits until ``count`` tasks of ``type_`` in ``queue``, all submitted (committed)
    already, have SUCCEEDED. It polls whether any is unfinished, by the indexes, and
    counts once at the end: PostgreSQL's CPU is counted per task, and a count over the
    whole table every 50 ms was the benchmark's own load on it (1-44 µs per task of the
    end-to-end phase, docs/performance.md, issue 19, fifth round)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not await db.fetchval(_UNFINISHED, type_, queue):
            break
        await asyncio.sleep(0.05)
    done = await db.fetchval(_SUCCEEDED, type_, queue)
    if done < count:
        raise RuntimeError(f"only {done} of {count} {type_} tasks succeeded within {within:.0f}s")


PICKUP_BUCKETS_MS = (1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 50.0, 100.0)
"""Upper bounds of the pickup histogram's buckets (the last bucket has none)."""


def histogram(values: list[float], bounds: tuple[float, ...] = PICKUP_BUCKETS_MS) -> dict[str, int]:
    """How many values fall in each bucket, keyed ``"<=2"`` (over the bound before, up to
    2 inclusive) and ``">100"`` for those over the last bound; empty buckets included, in
    order. A p99 says where the slowest 1 % begins; the buckets say whether it is a tail
    of a few stalls or a shifted body (issue 19's pickup target is about the former)."""
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    keys = [f"<={bound:g}" for bound in bounds] + [f">{bounds[-1]:g}"]
    return dict(zip(keys, counts, strict=True))


def pickup_figures(latencies: list[float]) -> dict[str, Any]:
    """The pickup latencies' figures (ms), as every benchmark that times pickups reports
    them: p50, p95, p99, max, the histogram and the number of samples."""
    return {
        "pickup_p50_ms": round(statistics.median(latencies), 2),
        "pickup_p95_ms": round(_percentile(latencies, 95), 2),
        "pickup_p99_ms": round(_percentile(latencies, 99), 2),
        "pickup_max_ms": round(max(latencies), 2),
        "pickup_histogram_ms": histogram(latencies),
        "pickup_samples": len(latencies),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def run(cfg: BenchConfig) -> dict[str, Any]:
    """Runs all three measurements and returns the figures."""
    procs: list[Process] = []
    scraper = _Scraper(cfg.scrape_interval)
    async with _postgres(cfg.dsn) as dsn:
        address = f"127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CONVEYOR_API_KEY", None)
        cli = [sys.executable, "-m", "conveyor.cli.main"]
        key: str | None = None
        auth = ["--insecure"]
        if not cfg.insecure:
            # One admin key with every scope: the coordinator adds it at start, the workers
            # and the client send it (checked once per call or stream, never per task).
            key = api_keys.generate()[1]
            env["CONVEYOR_BOOTSTRAP_KEY"] = env["CONVEYOR_API_KEY"] = key
            auth = []
        try:
            _say(f"starting the coordinator on {address} (authentication "
                 f"{'off' if cfg.insecure else 'on'}) …")  # fmt: skip
            coordinator = await asyncio.create_subprocess_exec(
                *cli,
                "--log-level",
                "warning",
                "coordinator",
                "--dsn",
                dsn,
                "--listen",
                address,
                *auth,
                *_metrics_args(cfg, scraper),
                env=env,
            )
            procs.append(coordinator)
            await _wait_serving(address, coordinator)
            scraper.start()
            db = await asyncpg.connect(dsn)
            async with AsyncClient(address, timeout=60.0, api_key=key) as client:
                figures = await _measure(cfg, client, db, address, env, procs, scraper)
            await db.close()
        finally:
            await scraper.stop()
            await _stop(procs)
    figures["metrics"] = cfg.metrics
    if cfg.metrics:
        figures["scrape_interval_s"] = cfg.scrape_interval
        figures["scrapes"] = scraper.scrapes
        figures["scraped_endpoints"] = len(scraper.scraped)
    _report(cfg, figures)
    return figures


async def _measure(
    cfg: BenchConfig,
    client: AsyncClient,
    db: asyncpg.Connection,
    address: str,
    env: dict[str, str],
    procs: list[Process],
    scraper: _Scraper,
) -> dict[str, Any]:
    # This process's start-up heap (and the processes' set-up above) lives through the
    # run: frozen, the client's full collections skip it, as the coordinator's and the
    # workers' do (``transport/_gc.py``); unfrozen, one took 0.2-0.4 s here, and a probe
    # whose send time was taken just before one counted it as pickup latency.
    freeze_startup_heap()
    # 1. Submit throughput, with no worker consuming the queue.
    specs = [TaskSpec(type="noop", queue="bench-submit", payload=b"", raw=True)] * cfg.tasks
    _say(f"submit: {cfg.tasks} tasks in batches of {cfg.batch} …")
    started = time.perf_counter()
    await _submit_all(client, specs, cfg)
    submit_s = time.perf_counter() - started

    # 2. End to end, with the workers running.
    _say(f"starting {cfg.workers} worker processes ({cfg.concurrency} slots each) …")
    for _ in range(cfg.workers):
        procs.append(
            await start_worker(address, cfg.concurrency, env, *_metrics_args(cfg, scraper))
        )
    await _warm_up(client, db)
    workers = [proc.pid for proc in procs[1:]]
    idle_rss = [cpu.rss_mb(pid) for pid in workers]
    groups = cpu.ProcessGroups(
        coordinator=procs[0].pid,
        workers=workers,
        postmaster=cpu.postmaster_of(await db.fetchval("SELECT pg_backend_pid()")),
    )
    if cfg.rate_limit is not None:
        await client.set_rate_limit(rate=cfg.rate_limit, queue=QUEUE)
    _say(f"end to end: {cfg.tasks} no-op tasks …")
    if cfg.concurrency_keys:
        specs = [
            TaskSpec(type="noop", queue=QUEUE, payload=b"", raw=True, **cfg.flow(i))
            for i in range(cfg.tasks)
        ]
    else:
        specs = [TaskSpec(type="noop", queue=QUEUE, payload=b"", raw=True)] * cfg.tasks
    before = cpu.sample(groups.resolve())
    await _submit_all(client, specs, cfg)
    await _wait_done(db, "noop", cfg.tasks + 1, within=max(120.0, cfg.tasks / 200))
    cpu_per_task = cpu.per_task_us(before, cpu.sample(groups.resolve()), cfg.tasks)
    span = await db.fetchrow(
        "SELECT extract(epoch FROM max(finish_time) - min(create_time)) AS seconds "
        "FROM tasks WHERE type = 'noop' AND queue = $1 AND payload = ''",
        QUEUE,
    )
    e2e_s = float(span["seconds"])

    # 3. Pickup latency at a light steady rate.
    count = max(1, int(cfg.latency_rate * cfg.latency_seconds))
    _say(f"pickup latency: {count} tasks at {cfg.latency_rate:.0f}/s …")
    interval = 1.0 / cfg.latency_rate
    # CPU per probe, by process: at this light rate a pickup's latency is mostly the CPU
    # each process spends on it (two gRPC calls, a commit, the hand-off), which is far
    # less sensitive to a shared machine's load than the latency itself. The phase's idle
    # work (heartbeats, the dispatcher's poll, the leader's maintenance) counts too.
    probes_before = cpu.sample(groups.resolve())
    start = time.perf_counter()

    answered: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
        sent = time.perf_counter()
        await client.submit(
            "probe", repr(time.time()).encode(), queue=QUEUE, raw=True, **cfg.flow(i)
        )
        answered.append((time.perf_counter() - sent) * 1000.0)

    await asyncio.gather(*(one(i) for i in range(count)))
    await _wait_done(db, "probe", count, within=60.0)
    cpu_per_probe = cpu.per_task_us(probes_before, cpu.sample(groups.resolve()), count)
    rows = await db.fetch("SELECT result FROM tasks WHERE type = 'probe'")
    latencies = [float(r["result"]) for r in rows]
    return {
        "tasks": cfg.tasks,
        "workers": cfg.workers,
        "authentication": not cfg.insecure,
        "submit_per_s": round(cfg.tasks / submit_s),
        "e2e_per_s": round(cfg.tasks / e2e_s),
        **pickup_figures(latencies),
        "submit_latency_p50_ms": round(statistics.median(answered), 2),
        "submit_latency_p99_ms": round(_percentile(answered, 99), 2),
        "cpu_per_task_us": cpu_per_task,
        "cpu_per_probe_us": cpu_per_probe,
        "worker_idle_rss_mb": max(idle_rss),
        "rate_limit": cfg.rate_limit,
        "concurrency_keys": cfg.concurrency_keys,
    }


async def _warm_up(client: AsyncClient, db: asyncpg.Connection) -> None:
    """One task through every worker path, so connection set-up is not measured."""
    warm = await client.submit("noop", b"warm", queue=QUEUE, raw=True)
    await client.wait(warm.id, timeout=60)


def _report(cfg: BenchConfig, f: dict[str, Any]) -> None:
    _say(
        f"""
Conveyor benchmark ({platform.machine()}, {os.cpu_count()} CPUs, \
Python {platform.python_version()}, authentication {"on" if f["authentication"] else "off"}, \
metrics {f"on, scraped every {cfg.scrape_interval:g} s" if cfg.metrics else "off"}{_flow(cfg)})
  submit (batched)      {f["submit_per_s"]:>10,} tasks/s
  end to end (no-op)    {f["e2e_per_s"]:>10,} tasks/s   ({cfg.tasks} tasks, {cfg.workers} workers)
  pickup latency        p50 {f["pickup_p50_ms"]} ms   p95 {f["pickup_p95_ms"]} ms   \
p99 {f["pickup_p99_ms"]} ms   max {f["pickup_max_ms"]} ms   \
({f["pickup_samples"]} tasks at {cfg.latency_rate:.0f}/s)
  pickup histogram      {_histogram_line(f["pickup_histogram_ms"])}
  lone submit answered  p50 {f["submit_latency_p50_ms"]} ms   p99 {f["submit_latency_p99_ms"]} ms
  CPU per task (e2e)    {_cpu_line(f["cpu_per_task_us"])}
  CPU per probe         {_cpu_line(f["cpu_per_probe_us"])}
  idle worker RSS       {f["worker_idle_rss_mb"]} MiB
"""
    )


def _histogram_line(buckets: dict[str, int]) -> str:
    """``<=2 ms: 812, <=3 ms: 150, …`` leaving out the empty buckets."""
    return ", ".join(f"{key} ms: {n}" for key, n in buckets.items() if n)


def _flow(cfg: BenchConfig) -> str:
    """The flow-control rules the run configured, for the report's first line."""
    rules = []
    if cfg.rate_limit is not None:
        rules.append(f"rate limit {cfg.rate_limit:g}/s")
    if cfg.concurrency_keys:
        rules.append(f"{cfg.concurrency_keys} concurrency keys")
    return "".join(f", {rule}" for rule in rules)


def _cpu_line(per_task: dict[str, float]) -> str:
    """``total 180 µs = coordinator 70 + workers 45 + …`` in the groups' order."""
    parts = [f"{name} {per_task[name]:g}" for name in cpu.GROUPS if name in per_task]
    line = f"{per_task['total']:g} µs = " + " + ".join(parts)
    if "postgres" not in per_task:
        line += " (PostgreSQL not on this machine: not counted)"
    return line
