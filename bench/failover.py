"""``conveyor bench-failover``: how long the cluster goes without a leader that dispatches.

Starts PostgreSQL (embedded, durable), one etcd member, three coordinator processes and one
worker process, with a backlog of delayed tasks falling due every 10 ms (so there is always
work the moment a leader can dispatch) and a trickle of client submits. Then, several
times: SIGKILL the leader, and measure from the kill to the first task the next leader
dispatched (its lease start, stamped by PostgreSQL, with the new epoch). Also reported:
when the new leader took office, and the clients' side of the failover. A client that
knows every coordinator submits one task after another (``--rate`` a second, each call
with the client's own failover and nothing more), and beside it reads the task submitted
last (GetTask, at the same rate); their unavailability in a run is the longest gap
between two answered calls around the kill (from a second before it until after the new
leader's first dispatch), and every call that raised counts as failed. The client spreads
both over the coordinators: each coordinator serves metrics, and the SubmitTask and
GetTask calls each one answered in the two seconds before each kill are reported (from
``conveyor_rpc_duration_seconds_count``), the leader's first. The killed coordinator is
restarted as a follower before the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from asyncio.subprocess import Process
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client.parser import text_string_to_metric_families

from conveyor.bench.etcd import local_etcd
from conveyor.bench.runner import _free_port, _postgres, _say, _wait_serving
from conveyor.client import AsyncClient, TaskSpec
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

CLI = [sys.executable, "-m", "conveyor.cli.main"]
COUNTED = ("SubmitTask", "GetTask")
"""The calls counted per coordinator, to show how the client spreads them."""
SPREAD_WINDOW = 2.0
"""Seconds before each kill over which each coordinator's calls are counted."""


def _calls_answered(url: str) -> dict[str, float]:
    """Of one coordinator's metrics: the COUNTED calls it answered OK so far."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    counts = dict.fromkeys(COUNTED, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name != "conveyor_rpc_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_count")
                and labels.get("service") == "conveyor.v1.TaskService"
                and labels.get("method") in counts
                and labels.get("code") == "OK"
            ):
                counts[labels["method"]] += sample.value
    return counts


async def _answered_by(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per coordinator address, the COUNTED calls it answered so far."""
    return {address: await asyncio.to_thread(_calls_answered, url) for address, url in urls.items()}


async def _leader(addresses: list[str]) -> str:
    """The leader's address as some coordinator reports it ("" while there is none)."""
    for address in addresses:
        with suppress(grpc.aio.AioRpcError):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = admin_service_pb2_grpc.AdminServiceStub(channel)
                status = await stub.GetClusterStatus(
                    admin_service_pb2.GetClusterStatusRequest(), timeout=1.0
                )
                if status.leader.address:
                    return str(status.leader.address)
    return ""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the failover benchmark (options as ``conveyor bench-failover`` takes them)."""
    folder = Path(tempfile.mkdtemp(prefix="conveyor-failover-"))
    procs: dict[str, Process] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Its own election key, so that a shared etcd's real clusters are never disturbed.
    cluster = f"bench-failover-{uuid.uuid4().hex[:8]}"
    try:
        async with AsyncExitStack() as stack:
            if args.etcd:
                etcd_urls = args.etcd
            else:
                _say("starting etcd …")
                etcd_urls = await stack.enter_async_context(local_etcd(folder / "etcd"))
            dsn = await stack.enter_async_context(_postgres(args.dsn))
            addresses = [f"127.0.0.1:{_free_port()}" for _ in range(args.coordinators)]
            metrics = {a: f"127.0.0.1:{_free_port()}" for a in addresses}
            urls = {a: f"http://{m}/metrics" for a, m in metrics.items()}

            async def start_coordinator(address: str) -> None:
                procs[address] = await asyncio.create_subprocess_exec(
                    *CLI,
                    "--log-level",
                    "warning",
                    "coordinator",
                    "--dsn",
                    dsn,
                    "--listen",
                    address,
                    "--etcd",
                    etcd_urls,
                    "--cluster",
                    cluster,
                    "--election-ttl",
                    str(args.election_ttl),
                    "--metrics-listen",
                    metrics[address],
                    # What is measured is the election; keys would cost nothing in it
                    # (conveyor bench measures their cost).
                    "--insecure",
                    env=env,
                )
                await _wait_serving(address, procs[address])

            _say(f"starting {args.coordinators} coordinators …")
            for address in addresses:
                await start_coordinator(address)
            worker = await asyncio.create_subprocess_exec(
                *CLI,
                "--log-level",
                "warning",
                "--coordinator",
                ",".join(addresses),
                "worker",
                "--demo",
                "--concurrency",
                "50",
                env=env,
            )
            db = await asyncpg.connect(dsn)
            try:
                outcome = await _runs(args, addresses, urls, procs, start_coordinator, db)
            finally:
                worker.send_signal(signal.SIGTERM)
                with suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 15)
                await db.close()
                await _stop_all(procs)  # before PostgreSQL and etcd go away under them
    finally:
        await _stop_all(procs)
        shutil.rmtree(folder, ignore_errors=True)
    durations, gaps, failed = outcome.durations, outcome.submit_gaps, outcome.failed_submits
    spread = {
        method: [[round(n) for n in run[method]] for run in outcome.spread] for method in COUNTED
    }
    figures = {
        "runs": len(durations),
        "election_ttl_s": args.election_ttl,
        "failover_median_s": round(statistics.median(durations), 3),
        "failover_max_s": round(max(durations), 3),
        "failover_all_s": [round(d, 3) for d in durations],
        "submit_gap_median_s": round(statistics.median(gaps), 3),
        "submit_gap_max_s": round(max(gaps), 3),
        "submit_gap_all_s": [round(g, 3) for g in gaps],
        "failed_submits": failed,
        "read_gap_median_s": round(statistics.median(outcome.read_gaps), 3),
        "read_gap_max_s": round(max(outcome.read_gaps), 3),
        "read_gap_all_s": [round(g, 3) for g in outcome.read_gaps],
        "failed_reads": outcome.failed_reads,
        # Per run, the calls each coordinator answered in the SPREAD_WINDOW before the
        # kill, the leader's first.
        "submits_per_coordinator": spread["SubmitTask"],
        "reads_per_coordinator": spread["GetTask"],
    }
    _say(
        f"\nfailover (leader SIGKILL -> first dispatch by the new leader), "
        f"{len(durations)} runs, election TTL {args.election_ttl:g}s:\n"
        f"  median {figures['failover_median_s']} s   max {figures['failover_max_s']} s   "
        f"all {figures['failover_all_s']}\n"
        f"submit unavailability (longest gap between acknowledged submits at "
        f"{args.rate:g}/s around the kill):\n"
        f"  median {figures['submit_gap_median_s']} s   max {figures['submit_gap_max_s']} s   "
        f"all {figures['submit_gap_all_s']}   failed submits {failed}\n"
        f"read unavailability (GetTask, the same way):\n"
        f"  median {figures['read_gap_median_s']} s   max {figures['read_gap_max_s']} s   "
        f"all {figures['read_gap_all_s']}   failed reads {outcome.failed_reads}\n"
        f"calls each coordinator answered in the {SPREAD_WINDOW:g} s before each kill "
        f"(leader first):\n"
        f"  SubmitTask {spread['SubmitTask']}\n"
        f"  GetTask    {spread['GetTask']}"
    )
    return figures


async def _stop_all(procs: dict[str, Process]) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclasses.dataclass
class _Outcome:
    durations: list[float] = dataclasses.field(default_factory=list)
    submit_gaps: list[float] = dataclasses.field(default_factory=list)
    read_gaps: list[float] = dataclasses.field(default_factory=list)
    failed_submits: int = 0
    failed_reads: int = 0
    #: Per run, per counted method, the calls each coordinator answered (leader first).
    spread: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)


class _Trickle:
    """One call after another at a rate: when each was answered, when each failed."""

    def __init__(self) -> None:
        self.acked: list[float] = []  # when each answered call was answered (unix time)
        self.failures: list[float] = []  # when each failed call was given up on
        self.answered = asyncio.Event()

    async def run(self, call: Any, rate: float, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if await call(n):
                    self.acked.append(time.time())
                    self.answered.set()
            except Exception:
                self.failures.append(time.time())
            await asyncio.sleep(1 / rate)

    async def answered_after(self, moment: float) -> None:
        with suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not (self.acked and self.acked[-1] > moment):
                    self.answered.clear()
                    await self.answered.wait()

    def gap(self, killed_at: float) -> tuple[float, float, int]:
        """The longest gap around the kill, when it began (from the kill), and the calls
        that failed from a second before it."""
        window = [t for t in self.acked if t >= killed_at - 1.0]
        gap, at = max(
            ((b - a, a - killed_at) for a, b in itertools.pairwise(window)),
            default=(0.0, 0.0),
        )
        if not window or window[0] > killed_at:
            first_gap = (window[0] if window else time.time()) - killed_at
            if first_gap > gap:
                gap, at = first_gap, 0.0
        failed = sum(1 for t in self.failures if t >= killed_at - 1.0)
        return gap, at, failed


async def _runs(
    args: argparse.Namespace,
    addresses: list[str],
    urls: dict[str, str],
    procs: dict[str, Process],
    start_coordinator: Any,
    db: asyncpg.Connection,
) -> _Outcome:
    """The runs: the dispatch gaps, the submits' and reads' gaps and failures, and how
    the calls spread over the coordinators."""
    out = _Outcome()
    submits, reads = _Trickle(), _Trickle()
    last: list[str] = []  # the task submitted last, for the reads
    async with AsyncClient(addresses, timeout=30.0) as client:
        # Work falling due every 10 ms for the whole run, already committed.
        start = datetime.now(UTC)
        backlog = [
            TaskSpec(type="echo", payload=i, run_at=start + timedelta(milliseconds=10 * i))
            for i in range(int(args.runs * 12 / 0.01))
        ]
        await client.submit_many(backlog)
        stop = asyncio.Event()

        async def submit(n: int) -> bool:
            # Each with the client's own failover only (it resends a submit safely: each
            # carries a request id); one that raises failed.
            task = await client.submit("echo", n, idempotency_key=f"failover-{n}")
            last[:] = [task.id]
            return True

        async def read(n: int) -> bool:
            if not last:
                return False
            await client.get(last[0])
            return True

        feeders = [
            asyncio.create_task(submits.run(submit, args.rate, stop)),
            asyncio.create_task(reads.run(read, args.rate, stop)),
        ]
        try:
            for run in range(1, args.runs + 1):
                leader = ""
                while not leader:
                    leader = await _leader(addresses)
                epoch = await db.fetchval("SELECT epoch FROM leadership")
                # Let the leader dispatch a little first, so workers are attached to it,
                # and count what each coordinator answers meanwhile.
                before = await _answered_by(urls)
                await asyncio.sleep(SPREAD_WINDOW)
                after = await _answered_by(urls)
                order = [leader, *(a for a in addresses if a != leader)]
                out.spread.append({m: [after[a][m] - before[a][m] for a in order] for m in COUNTED})
                killed_at = time.time()
                procs[leader].send_signal(signal.SIGKILL)
                await procs[leader].wait()
                first = None
                deadline = time.monotonic() + 60
                while first is None and time.monotonic() < deadline:
                    first = await db.fetchval(
                        "SELECT extract(epoch FROM min(lease_start_time)) FROM ("
                        " SELECT lease_start_time FROM tasks WHERE lease_epoch > $1"
                        " UNION ALL SELECT start_time FROM task_attempts WHERE epoch > $1) s",
                        epoch,
                    )
                    if first is None:
                        await asyncio.sleep(0.02)
                if first is None:
                    raise RuntimeError("no task was dispatched within 60 s of the failover")
                out.durations.append(float(first) - killed_at)
                elected = await db.fetchval(
                    "SELECT extract(epoch FROM update_time) FROM leadership"
                )
                await start_coordinator(leader)
                # The window closes with calls answered after the first dispatch.
                await submits.answered_after(float(first))
                await reads.answered_after(float(first))
                gap, at, failed = submits.gap(killed_at)
                read_gap, read_at, read_failed = reads.gap(killed_at)
                out.submit_gaps.append(gap)
                out.read_gaps.append(read_gap)
                _say(
                    f"  run {run}: {out.durations[-1]:.3f} s (new leader in office after "
                    f"{float(elected) - killed_at:.3f} s); submits: longest gap "
                    f"{gap:.3f} s (from {at:+.3f} s), {failed} failed; reads: longest gap "
                    f"{read_gap:.3f} s (from {read_at:+.3f} s), {read_failed} failed; "
                    f"submits per coordinator before the kill (leader first) "
                    f"{[round(n) for n in out.spread[-1]['SubmitTask']]}"
                )
        finally:
            stop.set()
            await asyncio.gather(*feeders)
    out.failed_submits = len(submits.failures)
    out.failed_reads = len(reads.failures)
    return out
