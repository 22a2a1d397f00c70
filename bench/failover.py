"""``conveyor bench-failover``: how long the cluster goes without a leader that dispatches.

Starts PostgreSQL (embedded, durable), one etcd member, three coordinator processes and one
worker process, with a backlog of delayed tasks falling due every 10 ms (so there is always
work the moment a leader can dispatch) and a trickle of client submits. Then, several
times: SIGKILL the leader, and measure from the kill to the first task the next leader
dispatched (its lease start, stamped by PostgreSQL, with the new epoch). Also reported:
when the new leader took office, and when a client's submit was next acknowledged. The
killed coordinator is restarted as a follower before the next run.
"""

from __future__ import annotations

import argparse
import asyncio
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
                durations = await _runs(args, addresses, procs, start_coordinator, db)
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
    }
    _say(
        f"\nfailover (leader SIGKILL -> first dispatch by the new leader), "
        f"{len(durations)} runs, election TTL {args.election_ttl:g}s:\n"
        f"  median {figures['failover_median_s']} s   max {figures['failover_max_s']} s   "
        f"all {figures['failover_all_s']}"
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
) -> list[float]:
    durations: list[float] = []
    async with AsyncClient(addresses, timeout=30.0) as client:
        # Work falling due every 10 ms for the whole run, already committed.
        start = datetime.now(UTC)
        backlog = [
            TaskSpec(type="echo", payload=i, run_at=start + timedelta(milliseconds=10 * i))
            for i in range(int(args.runs * 12 / 0.01))
        ]
        await client.submit_many(backlog)
        stop = asyncio.Event()

        async def trickle() -> None:
            # Keyed submits: the client may retry them across the failover.
            n = 0
            while not stop.is_set():
                n += 1
                with suppress(Exception):
                    await client.submit("echo", n, idempotency_key=f"failover-{n}")
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
                acked = None
                deadline = time.monotonic() + 30
                while acked is None and time.monotonic() < deadline:
                    acked = await db.fetchval(
                        "SELECT extract(epoch FROM min(create_time)) FROM tasks"
                        " WHERE idempotency_key IS NOT NULL AND create_time > to_timestamp($1)",
                        killed_at,
                    )
                    if acked is None:
                        await asyncio.sleep(0.05)
                client_s = float(acked) - killed_at if acked is not None else float("nan")
                _say(
                    f"  run {run}: {durations[-1]:.3f} s (new leader in office after "
                    f"{float(elected) - killed_at:.3f} s; next client submit acknowledged "
                    f"after {client_s:.3f} s)"
                )
        finally:
            stop.set()
            await feeder
    return durations
