"""``conveyor bench-failover``: how long the cluster goes without a leader that dispatches.

Starts PostgreSQL (embedded, durable), one etcd member, three coordinator processes and one
worker process, with a backlog of delayed tasks falling due every 10 ms (so there is always
work the moment a leader can dispatch) and a trickle of client submits. Then, several
times: SIGKILL the leader, and measure from the kill to the first task the next leader
dispatched (its lease start, stamped by PostgreSQL, with the new epoch). Also reported:
when the new leader took office, and the submits' side of the failover. A client that
knows every coordinator submits one task after another (``--rate`` a second, each call
with the client's own failover and nothing more); its submit unavailability in a run is
the longest gap between two acknowledged submits around the kill (from a second before
it until after the new leader's first dispatch), and every submit that raised counts as
failed. The killed coordinator is restarted as a follower before the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import Process
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from conveyor.bench.etcd import local_etcd
from conveyor.bench.runner import _free_port, _postgres, _say, _wait_serving
from conveyor.client import AsyncClient, TaskSpec
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

CLI = [sys.executable, "-m", "conveyor.cli.main"]


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
                durations, gaps, failed = await _runs(args, addresses, procs, start_coordinator, db)
            finally:
                worker.send_signal(signal.SIGTERM)
                with suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 15)
                await db.close()
                await _stop_all(procs)  # before PostgreSQL and etcd go away under them
    finally:
        await _stop_all(procs)
        shutil.rmtree(folder, ignore_errors=True)
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
    }
    _say(
        f"\nfailover (leader SIGKILL -> first dispatch by the new leader), "
        f"{len(durations)} runs, election TTL {args.election_ttl:g}s:\n"
        f"  median {figures['failover_median_s']} s   max {figures['failover_max_s']} s   "
        f"all {figures['failover_all_s']}\n"
        f"submit unavailability (longest gap between acknowledged submits at "
        f"{args.rate:g}/s around the kill):\n"
        f"  median {figures['submit_gap_median_s']} s   max {figures['submit_gap_max_s']} s   "
        f"all {figures['submit_gap_all_s']}   failed submits {failed}"
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


async def _runs(
    args: argparse.Namespace,
    addresses: list[str],
    procs: dict[str, Process],
    start_coordinator: Any,
    db: asyncpg.Connection,
) -> tuple[list[float], list[float], int]:
    """The runs: the dispatch gaps, the submit gaps (seconds) and the submits that failed."""
    durations: list[float] = []
    gaps: list[float] = []
    acked: list[float] = []  # when each acknowledged submit was answered (unix time)
    failures: list[float] = []  # when each failed submit was given up on
    async with AsyncClient(addresses, timeout=30.0) as client:
        # Work falling due every 10 ms for the whole run, already committed.
        start = datetime.now(UTC)
        backlog = [
            TaskSpec(type="echo", payload=i, run_at=start + timedelta(milliseconds=10 * i))
            for i in range(int(args.runs * 12 / 0.01))
        ]
        await client.submit_many(backlog)
        stop = asyncio.Event()
        answered = asyncio.Event()

        async def trickle() -> None:
            # One submit after another, each with the client's own failover only (it
            # resends a submit safely: each carries a request id); one that raises failed.
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    await client.submit("echo", n, idempotency_key=f"failover-{n}")
                    acked.append(time.time())
                    answered.set()
                except Exception:
                    failures.append(time.time())
                await asyncio.sleep(1 / args.rate)

        feeder = asyncio.create_task(trickle())
        try:
            for run in range(1, args.runs + 1):
                leader = ""
                while not leader:
                    leader = await _leader(addresses)
                epoch = await db.fetchval("SELECT epoch FROM leadership")
                # Let the leader dispatch a little first, so workers are attached to it.
                await asyncio.sleep(1.0)
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
                durations.append(float(first) - killed_at)
                elected = await db.fetchval(
                    "SELECT extract(epoch FROM update_time) FROM leadership"
                )
                await start_coordinator(leader)
                # The window closes with a submit acknowledged after the first dispatch.
                with suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        while not (acked and acked[-1] > float(first)):
                            answered.clear()
                            await answered.wait()
                window = [t for t in acked if t >= killed_at - 1.0]
                # The longest gap, and when it began (from the kill).
                gap, at = max(
                    ((b - a, a - killed_at) for a, b in itertools.pairwise(window)),
                    default=(0.0, 0.0),
                )
                if not window or window[0] > killed_at:
                    first_gap = (window[0] if window else time.time()) - killed_at
                    if first_gap > gap:
                        gap, at = first_gap, 0.0
                gaps.append(gap)
                failed = sum(1 for t in failures if t >= killed_at - 1.0)
                _say(
                    f"  run {run}: {durations[-1]:.3f} s (new leader in office after "
                    f"{float(elected) - killed_at:.3f} s); submits: longest gap "
                    f"{gap:.3f} s (from {at:+.3f} s), {failed} failed"
                )
        finally:
            stop.set()
            await feeder
    return durations, gaps, len(failures)
