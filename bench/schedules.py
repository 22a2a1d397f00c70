"""``conveyor bench-schedules``: firing lag of many cron schedules.

Starts PostgreSQL (embedded, durable, with ``track_commit_timestamp`` on) and a
coordinator process, creates the schedules, lets them run, and then reads from the
database, for every tick in a window of ``--seconds`` after a warm-up, the lag from the
tick time (the task's ``run_at``) to the commit of the transaction that wrote the task
(``pg_xact_commit_timestamp(xmin)``). Nobody consumes the tasks: this measures the firer.

The schedules: ``--schedules`` with ``--cron`` (by default 10,000 every second), or, with
``--per-second`` and ``--per-minute``, that many of each kind (``* * * * * *`` and
``* * * * *``, which all fire at second 0 of a minute, at the same tick as the
per-second ones). Each kind's tasks have their own type, so the lags are also given per
kind, and for the ticks at a minute's second 0 apart from the others.

Creating 100,000 schedules one CreateSchedule call at a time would take minutes, so the
first ``--api-creates`` go through the API (their rate is reported) and the rest are
validated by the same function CreateSchedule calls (``validate_schedule``, first tick
and all) and inserted in batches by ``store.schedules.insert_many``. All are created
paused and started together (``store.schedules.start_paused``) from the same tick.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from conveyor.bench.runner import _free_port, _percentile, _say, _stop, _wait_serving
from conveyor.client import AsyncClient
from conveyor.client._models import TaskTemplate
from conveyor.coordinator.config import DEFAULT_TENANT, CoordinatorConfig
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.schedules.cron import compile_cron, first_tick
from conveyor.coordinator.schedules.validation import validate_schedule
from conveyor.coordinator.store import schedules as schedule_store
from conveyor.v1 import schedule_pb2

QUEUE = "bench-schedules"
EVERY_SECOND = "* * * * * *"
EVERY_MINUTE = "* * * * *"
INSERT_BATCH = 5_000
# A firing later than this is late (the target's p99, issue 19).
LATE_MS = 100.0


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


def kinds(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(task type, cron, count) of each kind of schedule the run creates."""
    if args.per_second or args.per_minute:
        out = [("per-second", EVERY_SECOND, args.per_second)]
        return [*out, ("per-minute", EVERY_MINUTE, args.per_minute)]
    return [("noop", args.cron, args.schedules)]


async def _create_api(
    client: AsyncClient, names: list[tuple[str, str, str]], concurrency: int
) -> None:
    todo = iter(names)

    async def creator() -> None:
        for name, cron, type_ in todo:
            await client.create_schedule(name, cron, type_, b"", raw=True, queue=QUEUE, paused=True)

    await asyncio.gather(*(creator() for _ in range(concurrency)))


async def _insert_straight(db: asyncpg.Connection, names: list[tuple[str, str, str]]) -> None:
    """Validated as CreateSchedule validates, inserted in batches (no API call each)."""
    # The coordinator's default limit (the bench's coordinator runs with defaults).
    max_payload = CoordinatorConfig.max_payload_bytes
    for start in range(0, len(names), INSERT_BATCH):
        now = datetime.now(UTC)
        batch = []
        for name, cron, type_ in names[start : start + INSERT_BATCH]:
            template = TaskTemplate(type=type_, payload=b"", raw=True, queue=QUEUE)
            msg = schedule_pb2.Schedule(
                name=name, cron=cron, task_template=template.to_template(), paused=True
            )
            valid = validate_schedule(msg, tenant=DEFAULT_TENANT, max_payload_bytes=max_payload)
            first = first_tick(valid.spec, now, valid.row.start_time)
            batch.append(schedule_store.NewSchedule(uuid7(), valid.row, valid.paused, first))
        await schedule_store.insert_many(db, batch, now)


async def _create(
    args: argparse.Namespace, client: AsyncClient, db: asyncpg.Connection
) -> tuple[float, int]:
    """Creates the run's schedules; returns the API's creates per second, and how many
    went through the API."""
    names = [
        (f"bench-{type_}-{i:06d}", cron, type_)
        for type_, cron, count in kinds(args)
        for i in range(count)
    ]
    # Interleaved kinds, so the API's share has some of each.
    names.sort(key=lambda n: n[0].rsplit("-", 1)[1])
    through_api = names[: args.api_creates]
    started = time.perf_counter()
    await _create_api(client, through_api, args.create_concurrency)
    api_s = time.perf_counter() - started
    await _insert_straight(db, names[args.api_creates :])
    # Created paused, started together: a schedule created early in a long creation
    # would otherwise have a minute of ticks overdue when the measurement starts.
    now = datetime.now(UTC)
    for _, cron, _ in kinds(args):
        first = first_tick(compile_cron(cron), now + timedelta(seconds=1), None)
        assert first is not None
        await schedule_store.start_paused(db, DEFAULT_TENANT, cron, first, now)
    return (len(through_api) / api_s if through_api else 0.0), len(through_api)


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
    made = kinds(args)
    total = sum(count for _, _, count in made)
    _say("creating " + ", ".join(f"{count:,} {cron!r}" for _, cron, count in made) + " …")
    started = time.perf_counter()
    api_per_s, through_api = await _create(args, client, db)
    create_s = time.perf_counter() - started
    now = datetime.now(UTC)
    window_start = (now + timedelta(seconds=args.warm_up)).replace(microsecond=0)
    window_end = window_start + timedelta(seconds=args.seconds)
    if args.minute_boundaries and any(cron == EVERY_MINUTE and n for _, cron, n in made):
        # The per-minute ticks are the burst: the window holds --minute-boundaries of them.
        last = (window_start + timedelta(minutes=args.minute_boundaries)).replace(second=0)
        window_end = max(window_end, last + timedelta(seconds=1))
    seconds = (window_end - window_start).total_seconds()
    _say(
        f"created in {create_s:.1f}s; measuring the ticks from {window_start:%H:%M:%S} "
        f"to {window_end:%H:%M:%S} …"
    )
    await asyncio.sleep(max(0.0, (window_start - datetime.now(UTC)).total_seconds()))
    cpu_start, pg_start = _cpu_seconds(pid), _postgres_cpu_seconds(pgdata)
    await asyncio.sleep(max(0.0, (window_end - datetime.now(UTC)).total_seconds()))
    cpu_end, pg_end = _cpu_seconds(pid), _postgres_cpu_seconds(pgdata)
    # Let the firer finish the window's last ticks (or show that it cannot keep up).
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        behind = await db.fetchval(
            "SELECT count(*) FROM schedules WHERE NOT paused AND next_fire_time < $1", window_end
        )
        if behind == 0:
            break
        await asyncio.sleep(0.1)
    rows = await db.fetch(
        """
        SELECT type, run_at, extract(second FROM run_at) = 0 AS minute_boundary,
            extract(epoch FROM pg_xact_commit_timestamp(xmin) - run_at) * 1000 AS lag_ms
        FROM tasks
        WHERE queue = $3 AND run_at >= $1 AND run_at < $2
        """,
        window_start,
        window_end,
        QUEUE,
    )
    lags = [float(r["lag_ms"]) for r in rows]
    expected = 0
    for _, cron, count in made:
        if cron == EVERY_SECOND:
            expected += count * round(seconds)
        elif cron == EVERY_MINUTE:
            minutes = sum(
                1
                for k in range(round(seconds))
                if (window_start + timedelta(seconds=k)).second == 0
            )
            expected += count * minutes
        else:
            expected = -1
    cpu = pg_cpu = None
    if cpu_start is not None and cpu_end is not None:
        cpu = round(100.0 * (cpu_end - cpu_start) / seconds, 1)
    if pg_start is not None and pg_end is not None:
        pg_cpu = round(100.0 * (pg_end - pg_start) / seconds, 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    split: dict[str, dict[str, Any]] = {}
    for type_, _, count in made:
        if not count:
            continue
        mine = [r for r in rows if r["type"] == type_]
        split[type_] = _lag_figures([float(r["lag_ms"]) for r in mine])
        # Split only where a kind fires both at second 0 and at other seconds.
        if len({r["minute_boundary"] for r in mine}) == 2:
            split[f"{type_} at second 0"] = _lag_figures(
                [float(r["lag_ms"]) for r in mine if r["minute_boundary"]]
            )
    return {
        "late_ticks": _late_ticks(rows),
        "schedules": total,
        "kinds": {type_: {"cron": cron, "count": count} for type_, cron, count in made},
        "cron": args.cron if len(made) == 1 else None,
        "window_s": seconds,
        "firings": len(lags),
        "expected_firings": expected if expected >= 0 else None,
        "firings_per_s": round(len(lags) / seconds),
        **{f"lag_{k}": v for k, v in _lag_figures(lags).items()},
        "lags_by_kind": split,
        "coordinator_cpu_pct": cpu,
        "postgres_cpu_pct": pg_cpu,
        "load_average_1m": round(load, 2) if load is not None else None,
        "create_s": round(create_s, 1),
        "create_per_s": round(total / create_s),
        "api_creates": through_api,
        "api_create_per_s": round(api_per_s),
    }


def _late_ticks(rows: Sequence[asyncpg.Record], limit: int = 10) -> list[dict[str, Any]]:
    """The ticks with the most firings later than LATE_MS, worst first: when in the
    minute they were (second 59 is the second before the per-minute burst) and how late.
    The p99 says how many firings were late; this says which rounds."""
    by_tick: dict[datetime, list[float]] = collections.defaultdict(list)
    for r in rows:
        by_tick[r["run_at"]].append(float(r["lag_ms"]))
    late = [(sum(1 for lag in lags if lag > LATE_MS), tick, lags) for tick, lags in by_tick.items()]
    late.sort(key=lambda item: (-item[0], item[1]))
    return [
        {
            "tick": f"{tick.astimezone(UTC):%H:%M:%S}",
            "late": count,
            "firings": len(lags),
            "p50_ms": round(_percentile(lags, 50), 1),
            "max_ms": round(max(lags), 1),
        }
        for count, tick, lags in late[:limit]
        if count
    ]


def _lag_figures(lags: list[float]) -> dict[str, Any]:
    if not lags:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(lags),
        "p50_ms": round(_percentile(lags, 50), 1),
        "p95_ms": round(_percentile(lags, 95), 1),
        "p99_ms": round(_percentile(lags, 99), 1),
        "max_ms": round(max(lags), 1),
        "min_ms": round(min(lags), 1),
    }


def _report(args: argparse.Namespace, f: dict[str, Any]) -> None:
    expected = (
        f" of {f['expected_firings']:,} expected" if f["expected_firings"] is not None else ""
    )
    made = ", ".join(f"{k['count']:,} {k['cron']!r}" for k in f["kinds"].values())
    lines = [
        "",
        f"Conveyor schedule benchmark ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()})",
        f"  schedules             {f['schedules']:>10,}   ({made})",
        f"  firings               {f['firings']:>10,}{expected} in {f['window_s']:.0f}s "
        f"({f['firings_per_s']:,}/s)",
        f"  lag (tick → commit)   p50 {f['lag_p50_ms']} ms   p95 {f['lag_p95_ms']} ms   "
        f"p99 {f['lag_p99_ms']} ms   max {f['lag_max_ms']} ms",
    ]
    if len(f["lags_by_kind"]) > 1:
        for name, k in f["lags_by_kind"].items():
            lines.append(
                f"    {name:<25} p50 {k['p50_ms']} ms   p99 {k['p99_ms']} ms   "
                f"max {k['max_ms']} ms   ({k['n']:,} firings)"
            )
    if f["late_ticks"]:
        lines.append(f"  ticks with firings later than {LATE_MS:.0f} ms (worst first):")
        lines += [
            f"    {t['tick']}  {t['late']:,} of {t['firings']:,} late   p50 {t['p50_ms']} ms   "
            f"max {t['max_ms']} ms"
            for t in f["late_ticks"]
        ]
    lines += [
        f"  CPU (% of one core)   coordinator {f['coordinator_cpu_pct']}   "
        f"PostgreSQL {f['postgres_cpu_pct']}   (machine load average {f['load_average_1m']})",
        f"  created in            {f['create_s']:>10} s   ({f['create_per_s']:,}/s; "
        f"CreateSchedule {f['api_create_per_s']:,}/s over {f['api_creates']:,} calls)",
    ]
    _say("\n".join(lines) + "\n")
