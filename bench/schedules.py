"""``conveyor bench-schedules``: firing lag of many second-level cron schedules.

Starts PostgreSQL (embedded, durable, with ``track_commit_timestamp`` on) and a
coordinator process, creates ``--schedules`` schedules through the API (by default every
second: ``* * * * * *``), lets them run, and then reads from the database, for every tick
in a window of ``--seconds`` after a warm-up, the lag from the tick time (the task's
``run_at``) to the commit of the transaction that wrote the task
(``pg_xact_commit_timestamp(xmin)``). Nobody consumes the tasks: this measures the firer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from conveyor.bench.runner import _free_port, _percentile, _say, _stop, _wait_serving
from conveyor.client import AsyncClient


@asynccontextmanager
async def _postgres(dsn: str | None) -> AsyncIterator[tuple[str, Path | None]]:
    """(DSN, data folder when embedded) of the PostgreSQL to use."""
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SHOW track_commit_timestamp") != "on":
                raise SystemExit(
                    "bench-schedules reads commit times: set track_commit_timestamp = on in "
                    "that server's configuration and restart it"
                )
        finally:
            await conn.close()
        yield dsn, None
        return
    from conveyor.embedded import EmbeddedPostgres

    folder = Path(tempfile.mkdtemp(prefix="conveyor-bench-schedules-"))
    # Durable on purpose: every firing transaction is fsynced, as in production.
    server = EmbeddedPostgres(folder / "pg", durable=True)
    try:
        _say(f"starting PostgreSQL (durable) in {folder} …")
        dsn = await asyncio.to_thread(server.start)
        conn = await asyncpg.connect(dsn)
        await conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        await conn.close()
        await asyncio.to_thread(server.stop)
        yield await asyncio.to_thread(server.start), server.pgdata
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux), or None."""
    fields = _stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds(pgdata: Path | None) -> float | None:
    """CPU time of an embedded server: its postmaster and the postmaster's children."""
    if pgdata is None:
        return None
    try:
        master = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(pid)
        if fields is not None and master in (int(pid), int(fields[1])):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _create(client: AsyncClient, count: int, cron: str, concurrency: int) -> None:
    names = iter(range(count))

    async def creator() -> None:
        for i in names:
            await client.create_schedule(
                f"bench-{i:06d}", cron, "noop", b"", raw=True, queue="bench-schedules"
            )

    await asyncio.gather(*(creator() for _ in range(concurrency)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with _postgres(args.dsn) as (dsn, pgdata):
        address = f"127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        _say(f"starting the coordinator on {address} …")
        coordinator = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor.cli.main",
            "--log-level",
            "warning",
            "coordinator",
            "--dsn",
            dsn,
            "--listen",
            address,
            # What is measured is firing; keys would cost nothing in it (conveyor bench
            # measures their cost).
            "--insecure",
            env=env,
        )
        try:
            await _wait_serving(address, coordinator)
            db = await asyncpg.connect(dsn)
            try:
                async with AsyncClient(address, timeout=60.0) as client:
                    figures = await _measure(args, client, db, coordinator.pid, pgdata)
            finally:
                await db.close()
        finally:
            await _stop([coordinator])
    _report(args, figures)
    return figures


async def _measure(
    args: argparse.Namespace,
    client: AsyncClient,
    db: asyncpg.Connection,
    pid: int,
    pgdata: Path | None,
) -> dict[str, Any]:
    _say(f"creating {args.schedules} schedules ({args.cron!r}) …")
    started = time.perf_counter()
    await _create(client, args.schedules, args.cron, args.create_concurrency)
    create_s = time.perf_counter() - started
    now = datetime.now(UTC)
    window_start = (now + timedelta(seconds=args.warm_up)).replace(microsecond=0)
    window_end = window_start + timedelta(seconds=args.seconds)
    _say(
        f"created in {create_s:.1f}s; measuring the ticks from {window_start:%H:%M:%S} "
        f"to {window_end:%H:%M:%S} …"
    )
    await asyncio.sleep(max(0.0, (window_start - datetime.now(UTC)).total_seconds()))
    cpu_start, pg_start = _cpu_seconds(pid), _postgres_cpu_seconds(pgdata)
    await asyncio.sleep(max(0.0, (window_end - datetime.now(UTC)).total_seconds()))
    cpu_end, pg_end = _cpu_seconds(pid), _postgres_cpu_seconds(pgdata)
    # Let the firer finish the window's last ticks (or show that it cannot keep up).
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        behind = await db.fetchval(
            "SELECT count(*) FROM schedules WHERE NOT paused AND next_fire_time < $1", window_end
        )
        if behind == 0:
            break
        await asyncio.sleep(0.1)
    rows = await db.fetch(
        """
        SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - run_at) * 1000 AS lag_ms
        FROM tasks
        WHERE queue = 'bench-schedules' AND run_at >= $1 AND run_at < $2
        """,
        window_start,
        window_end,
    )
    lags = [float(r["lag_ms"]) for r in rows]
    every_second = args.cron.split() == ["*"] * 6
    expected = args.schedules * round(args.seconds) if every_second else None
    cpu = pg_cpu = None
    if cpu_start is not None and cpu_end is not None:
        cpu = round(100.0 * (cpu_end - cpu_start) / args.seconds, 1)
    if pg_start is not None and pg_end is not None:
        pg_cpu = round(100.0 * (pg_end - pg_start) / args.seconds, 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "schedules": args.schedules,
        "cron": args.cron,
        "window_s": args.seconds,
        "firings": len(lags),
        "expected_firings": expected,
        "firings_per_s": round(len(lags) / args.seconds),
        "lag_p50_ms": round(_percentile(lags, 50), 1) if lags else None,
        "lag_p95_ms": round(_percentile(lags, 95), 1) if lags else None,
        "lag_p99_ms": round(_percentile(lags, 99), 1) if lags else None,
        "lag_max_ms": round(max(lags), 1) if lags else None,
        "lag_min_ms": round(min(lags), 1) if lags else None,
        "coordinator_cpu_pct": cpu,
        "postgres_cpu_pct": pg_cpu,
        "load_average_1m": round(load, 2) if load is not None else None,
        "create_per_s": round(args.schedules / create_s),
    }


def _report(args: argparse.Namespace, f: dict[str, Any]) -> None:
    expected = f" of {f['expected_firings']} expected" if f["expected_firings"] is not None else ""
    _say(
        f"""
Conveyor schedule benchmark ({platform.machine()}, {os.cpu_count()} CPUs, \
Python {platform.python_version()})
  schedules             {f["schedules"]:>10,}   cron {f["cron"]!r}
  firings               {f["firings"]:>10,}{expected} in {f["window_s"]:.0f}s \
({f["firings_per_s"]:,}/s)
  lag (tick → commit)   p50 {f["lag_p50_ms"]} ms   p95 {f["lag_p95_ms"]} ms   \
p99 {f["lag_p99_ms"]} ms   max {f["lag_max_ms"]} ms
  CPU (% of one core)   coordinator {f["coordinator_cpu_pct"]}   \
PostgreSQL {f["postgres_cpu_pct"]}   (machine load average {f["load_average_1m"]})
  CreateSchedule        {f["create_per_s"]:>10,} /s
"""
    )
