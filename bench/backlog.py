"""``conveyor bench --backlog N``: dispatch and submit rates with N tasks waiting.

A coordinator process (authentication on) over an embedded, durable PostgreSQL (or
``--dsn``). The backlog is written straight into the tasks table by binary COPY (asyncpg's
``copy_records_to_table``, in slices): a submit of ten million tasks would take longer
than everything measured. Then, from the figures' start to their end:

- load: rows/s of the COPY, and the VACUUM (ANALYZE) after it, which leaves the table
  as a long-lived one would be (visibility map set, statistics read) rather than handing
  the measurement an autovacuum of the whole load in the middle of it;
- sizes: the tasks table (heap) and each of its indexes (``pg_relation_size``), and
  ``pg_indexes_size``, after the load and at the end;
- submit_per_s: tasks committed per second by batched SubmitTasks calls into another
  queue while the backlog waits (client clock, as ``conveyor bench`` measures it);
- dispatch windows: the workers take the backlog's own tasks, in the claim's order
  (priority, then age: the backlog's ids are time-ordered and older than anything
  submitted). The backlog's queue is paused until every worker is connected, so no
  window includes connecting. Window ``first`` is the first ``--dispatch`` tasks in that
  order; with ``--churn C`` window ``churned`` is the ``--dispatch`` tasks after the first
  C, dispatched after C dead rows have piled up. Each window's rates come from the
  database's timestamps of its own rows: dispatch_per_s from the span of their
  ``lease_start_time``, e2e_per_s from the first lease to the last ``finish_time``. The
  load is N + C + dispatch tasks, so at least N wait throughout every window;
- the claim's plan: ``EXPLAIN (ANALYZE, BUFFERS)`` of the claim's head query (the ready
  index scan the claim statement runs per queue, ``store/tasks.py``), after the load and
  after each window, with the table's live and dead tuples and autovacuum runs
  (``pg_stat_user_tables``).

Compare two runs: ``--backlog 10000`` and ``--backlog 10000000``, same other options.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
import uuid
from asyncio.subprocess import Process
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from conveyor.bench.runner import (
    BenchConfig,
    _free_port,
    _postgres,
    _say,
    _stop,
    _submit_all,
    _wait_serving,
    start_worker,
)
from conveyor.bench.worker import QUEUE
from conveyor.client import AsyncClient, TaskSpec
from conveyor.coordinator.config import DEFAULT_TENANT
from conveyor.coordinator.store.tasks import PENDING, SUCCEEDED
from conveyor.coordinator.tenancy import keys as api_keys

COPY_SLICE = 100_000
"""Rows per ``copy_records_to_table`` call: each slice's records are built, encoded and
sent as one COPY, so memory stays bounded however deep the backlog."""

COPY_COLUMNS = (
    "id", "tenant", "queue", "type", "payload", "content_type", "state", "priority",
    "max_attempts", "run_at", "timeout_ms", "retry_initial_ms", "retry_max_ms",
    "retry_multiplier", "retry_jitter", "create_time", "update_time",
)  # fmt: skip

WINDOW_TIMEOUT = 900.0
"""Seconds a dispatch window may take before the run gives up (a stalled dispatch)."""


@dataclass(frozen=True)
class BacklogConfig:
    backlog: int = 10_000_000
    """Tasks waiting throughout the dispatch windows."""
    dispatch: int = 50_000
    """Tasks per dispatch window."""
    churn: int = 0
    """Tasks dispatched between the first window and the churned one (0: no second)."""
    tasks: int = 20_000
    """Tasks of the submit measurement."""
    workers: int = 2
    concurrency: int = 500
    batch: int = 500
    submitters: int = 4
    dsn: str | None = None
    vacuum: bool = True
    """VACUUM (ANALYZE) the table after the load (as a long-lived table would be)."""

    @property
    def loaded(self) -> int:
        return self.backlog + self.churn + self.dispatch * (2 if self.churn else 1)


def backlog_ids(count: int, start: int = 0) -> list[uuid.UUID]:
    """Ids ``start`` to ``start + count`` of the backlog: UUIDv7s from one millisecond an
    hour before 2026-01-01 with the counter in the random bits, so they sort by index
    and before every id a coordinator makes now (the claim takes them in this order)."""
    millis = int(datetime(2025, 12, 31, 23, tzinfo=UTC).timestamp() * 1000)
    # version 7 in bits 76-79, variant 0b10 in bits 62-63, the counter below them.
    base = (millis << 80) | (0x7 << 76) | (0b10 << 62)
    return [uuid.UUID(int=base | i) for i in range(start, start + count)]


async def load(conn: asyncpg.Connection, count: int, queue: str = QUEUE) -> float:
    """Writes ``count`` ready no-op tasks into ``queue`` by binary COPY; returns seconds."""
    when = datetime(2025, 12, 31, 23, tzinfo=UTC)
    # Every column but the id is the same object in every record: only the id is built.
    tail = (
        DEFAULT_TENANT, queue, "noop", b"", "application/octet-stream", PENDING, 0, 3, when,
        60_000, 1_000, 60_000, 2.0, 0.0, when, when,
    )  # fmt: skip
    started = time.perf_counter()
    done = 0
    while done < count:
        n = min(COPY_SLICE, count - done)
        records = [(i, *tail) for i in backlog_ids(n, done)]
        await conn.copy_records_to_table("tasks", records=records, columns=COPY_COLUMNS)
        done += n
        if done % 1_000_000 == 0 or done == count:
            rate = done / (time.perf_counter() - started)
            _say(f"  loaded {done:,} of {count:,} ({rate:,.0f} rows/s)")
    return time.perf_counter() - started


async def sizes(conn: asyncpg.Connection) -> dict[str, int]:
    """Bytes of the tasks table's heap, of each of its indexes, and of all indexes."""
    rows = await conn.fetch(
        """
        SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'tasks'::regclass ORDER BY c.relname
        """
    )
    out = {"table": int(await conn.fetchval("SELECT pg_relation_size('tasks')"))}
    out["indexes"] = int(await conn.fetchval("SELECT pg_indexes_size('tasks')"))
    out.update({f"index {r['name']}": int(r["bytes"]) for r in rows})
    return out


# The head query of the claim (store/tasks.py, claim_tasks) for one queue, as the
# dispatcher runs it for the benchmark's worker.
CLAIM_HEAD = f"""
SELECT id, priority, deadline, octet_length(payload) AS size FROM tasks
WHERE tenant = $1 AND state = {PENDING} AND queue = $2 AND type = ANY($3::text[])
  AND concurrency_key IS NULL AND (deadline IS NULL OR deadline > now())
  AND ($4::text[] IS NULL OR encryption_key IS NULL OR encryption_key = ANY($4::text[]))
ORDER BY priority DESC, deadline, id
LIMIT $5
FOR UPDATE SKIP LOCKED
"""


async def claim_plan(conn: asyncpg.Connection, limit: int) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim's head query, rolled back (it locks what
    it reads, as the claim does): the index it scans, buffers and time; and the table's
    tuple and autovacuum counters."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + CLAIM_HEAD,
            DEFAULT_TENANT,
            QUEUE,
            ["noop", "probe"],
            None,
            limit,
        )
    finally:
        await transaction.rollback()  # the locks go; nothing was written
    lines = [r[0] for r in rows]
    text = "\n".join(lines)
    stats = await conn.fetchrow(
        """
        SELECT n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count,
            autoanalyze_count, vacuum_count
        FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass
        """
    )
    index = next((w for w in text.split() if w.startswith("tasks_")), None)
    return {
        "index": index,
        "on_index": "Index Scan" in text and "Seq Scan" not in text and "Sort" not in text,
        "execution_ms": _after(text, "Execution Time:"),
        "buffers": _buffers(lines),
        **{k: int(v) for k, v in (stats or {}).items()},
        "plan": text,
    }


def _after(text: str, label: str) -> float | None:
    for line in text.splitlines():
        if label in line:
            return float(line.split(label)[1].split()[0])
    return None


def _buffers(lines: list[str]) -> str | None:
    """The top node's ``Buffers:`` line (the whole query's)."""
    for line in lines:
        if "Buffers:" in line:
            return line.split("Buffers:")[1].strip()
    return None


async def _window(db: asyncpg.Connection, name: str, first: int, count: int) -> dict[str, Any]:
    """Waits for the backlog's tasks ``first`` to ``first + count`` (in claim order) to
    finish; their dispatch and end-to-end rates from their own timestamps."""
    lo, hi = backlog_ids(1, first)[0], backlog_ids(1, first + count)[0]
    deadline = time.monotonic() + WINDOW_TIMEOUT
    while True:
        # A range of the primary key: reads the window's rows only, whatever the depth.
        done = await db.fetchval(
            f"SELECT count(*) FROM tasks WHERE id >= $1 AND id < $2 AND state = {SUCCEEDED}",
            lo,
            hi,
        )
        if done >= count:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"window {name}: only {done} of {count} tasks finished in {WINDOW_TIMEOUT:.0f}s"
            )
        await asyncio.sleep(0.5)
    span = await db.fetchrow(
        """
        SELECT extract(epoch FROM max(lease_start_time) - min(lease_start_time)) AS leases,
            extract(epoch FROM max(finish_time) - min(lease_start_time)) AS e2e
        FROM tasks WHERE id >= $1 AND id < $2
        """,
        lo,
        hi,
    )
    assert span is not None
    return {
        "name": name,
        "after": first,
        "tasks": count,
        "dispatch_per_s": round((count - 1) / max(float(span["leases"]), 1e-6)),
        "e2e_per_s": round(count / max(float(span["e2e"]), 1e-6)),
    }


async def run(cfg: BacklogConfig) -> dict[str, Any]:
    procs: list[Process] = []
    async with _postgres(cfg.dsn) as dsn:
        address = f"127.0.0.1:{_free_port()}"
        key = api_keys.generate()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CONVEYOR_BOOTSTRAP_KEY"] = env["CONVEYOR_API_KEY"] = key
        cli = [sys.executable, "-m", "conveyor.cli.main", "--log-level", "warning"]
        try:
            _say(f"starting the coordinator on {address} …")
            coordinator = await asyncio.create_subprocess_exec(
                *cli, "coordinator", "--dsn", dsn, "--listen", address, env=env
            )
            procs.append(coordinator)
            await _wait_serving(address, coordinator)
            db = await asyncpg.connect(dsn)
            try:
                async with AsyncClient(address, timeout=120.0, api_key=key) as client:
                    figures = await _measure(cfg, client, db, address, env, procs)
            finally:
                await db.close()
        finally:
            await _stop(procs)
    _report(cfg, figures)
    return figures


async def _measure(
    cfg: BacklogConfig,
    client: AsyncClient,
    db: asyncpg.Connection,
    address: str,
    env: dict[str, str],
    procs: list[Process],
) -> dict[str, Any]:
    out: dict[str, Any] = {"backlog": cfg.backlog, "loaded": cfg.loaded}
    # Paused first: the workers start on a whole backlog, all connected.
    await client.pause_queue(QUEUE)
    _say(f"loading {cfg.loaded:,} tasks by binary COPY (slices of {COPY_SLICE:,}) …")
    load_s = await load(db, cfg.loaded)
    out["load_s"] = round(load_s, 1)
    out["load_rows_per_s"] = round(cfg.loaded / load_s)
    if cfg.vacuum:
        _say("VACUUM (ANALYZE) tasks …")
        started = time.perf_counter()
        await db.execute("VACUUM (ANALYZE) tasks")
        out["vacuum_s"] = round(time.perf_counter() - started, 1)
    out["sizes_loaded"] = await sizes(db)
    out["tasks_reloptions"] = await db.fetchval(
        "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = 'tasks'::regclass"
    )
    plans = {"loaded": await claim_plan(db, cfg.concurrency)}

    _say(f"submit: {cfg.tasks} tasks in batches of {cfg.batch} beside the backlog …")
    specs = [TaskSpec(type="noop", queue="bench-submit", payload=b"", raw=True)] * cfg.tasks
    started = time.perf_counter()
    await _submit_all(client, specs, BenchConfig(batch=cfg.batch, submitters=cfg.submitters))
    out["submit_per_s"] = round(cfg.tasks / (time.perf_counter() - started))

    _say(f"starting {cfg.workers} worker processes ({cfg.concurrency} slots each) …")
    for _ in range(cfg.workers):
        procs.append(await start_worker(address, cfg.concurrency, env))
    deadline = time.monotonic() + 120
    while len(await client.workers()) < cfg.workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cfg.workers} workers did not connect within 120s")
        await asyncio.sleep(0.1)
    # The dispatch starts as the resume commits; the call's answer then counts the queue's
    # tasks by state, up to a cap (10,000: at most that many index entries a count), while
    # the first window runs. Before the cap it read the whole table at 10,000,000 waiting
    # (1.4 s of PostgreSQL; docs/performance.md, issue 19, sixth and seventh rounds).
    started = time.perf_counter()
    await client.resume_queue(QUEUE)
    out["resume_s"] = round(time.perf_counter() - started, 2)
    windows = []
    _say(f"dispatch: the first {cfg.dispatch:,} of the backlog …")
    windows.append(await _window(db, "first", 0, cfg.dispatch))
    plans["after_first"] = await claim_plan(db, cfg.concurrency)
    if cfg.churn:
        after = cfg.dispatch + cfg.churn
        _say(f"dispatch: {cfg.dispatch:,} more after {after:,} dispatched …")
        windows.append(await _window(db, "churned", after, cfg.dispatch))
        plans["after_churned"] = await claim_plan(db, cfg.concurrency)
    await _stop(procs[1:])
    del procs[1:]
    out["windows"] = windows
    out["claim_plans"] = plans
    out["sizes_end"] = await sizes(db)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


def _report(cfg: BacklogConfig, f: dict[str, Any]) -> None:
    lines = [
        "",
        f"Conveyor backlog benchmark ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {f['load_average_1m']})",
        f"  backlog               {cfg.backlog:>12,} waiting ({f['loaded']:,} loaded)",
        f"  load (binary COPY)    {f['load_s']:>10} s   {f['load_rows_per_s']:,} rows/s"
        + (f"   VACUUM (ANALYZE) {f['vacuum_s']} s" if "vacuum_s" in f else ""),
        f"  submit (batched)      {f['submit_per_s']:>12,} tasks/s",
        f"  ResumeQueue           {f['resume_s']:>12} s   (its answer counts the queue's tasks)",
    ]
    for w in f["windows"]:
        lines.append(
            f"  dispatch {w['name']:<12} {w['dispatch_per_s']:>12,} tasks/s   e2e "
            f"{w['e2e_per_s']:,} tasks/s   ({w['tasks']:,} tasks after {w['after']:,})"
        )
    for when, p in f["claim_plans"].items():
        lines.append(
            f"  claim plan {when:<13} {p['index']} "
            f"({'index order' if p['on_index'] else 'NOT on its index'}), "
            f"{p['execution_ms']} ms, buffers {p['buffers']}, dead tuples {p['n_dead_tup']:,}, "
            f"autovacuums {p['autovacuum_count']}"
        )
    for when in ("sizes_loaded", "sizes_end"):
        parts = ", ".join(f"{k} {_mib(v)}" for k, v in f[when].items())
        lines.append(f"  {when.replace('_', ' '):<21} {parts}")
    _say("\n".join(lines) + "\n")
