"""``conveyor bench-console``: the web console's time per page with many tasks stored.

Starts PostgreSQL (embedded and durable, unless ``--dsn``), a coordinator and the console in this
process, writes ``--tasks`` tasks straight into the tasks table (one tenant; ten queues,
twenty types, seven label values, spread over the last ``--tasks`` half-seconds; one in
fifty dead with an error, one in ninety-seven waiting, the rest succeeded: a table that is
mostly history, as in production), signs in, and times each page's GET from this process
(``--runs`` times after one warm-up): the time the console and the coordinator take to
answer, on loopback. The issue's target is under 300 ms per page with 1,000,000 tasks.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from conveyor.bench.runner import _postgres, _say

#: Tasks written per INSERT statement.
_CHUNK = 100_000


@dataclass(frozen=True)
class ConsoleBenchConfig:
    tasks: int = 1_000_000
    runs: int = 10
    dsn: str | None = None


async def _fill(dsn: str, total: int) -> None:
    """Writes ``total`` tasks of tenant "default" (ids are UUIDv7 of their creation time)."""
    from conveyor.coordinator.store.tasks import DEAD, PENDING, SUCCEEDED

    sql = f"""
        INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
            attempt, max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms,
            retry_multiplier, retry_jitter, labels, last_error, create_time, update_time,
            finish_time)
        SELECT uuidv7(-made), 'default', 'queue-' || (g % 10), 'type-' || (g % 20),
            '\\x7b7d'::bytea, 'application/json',
            CASE WHEN g % 50 = 0 THEN {DEAD} WHEN g % 97 = 0 THEN {PENDING} ELSE {SUCCEEDED} END,
            0, CASE WHEN g % 97 = 0 THEN 0 ELSE 1 END, 3, now() - made, 60000, 1000, 60000, 2.0,
            0.1, jsonb_build_object('team', 'team-' || (g % 7)),
            CASE WHEN g % 50 = 0 THEN 'ValueError: bad input ' || (g % 5)
                || E'\\nTraceback (most recent call last):\\n  File "app.py", line 1' ELSE '' END,
            now() - made, now() - made,
            CASE WHEN g % 97 = 0 THEN NULL ELSE now() - made END
        FROM generate_series($1::bigint, $2::bigint) AS g,
            LATERAL (SELECT make_interval(secs => ($3 - g) * 0.5) AS made) AS m
    """
    conn = await asyncpg.connect(dsn)
    try:
        for start in range(1, total + 1, _CHUNK):
            end = min(total, start + _CHUNK - 1)
            await conn.execute(sql, start, end, total)
            _say(f"  {end:,} of {total:,} tasks written")
        await conn.execute("ANALYZE tasks")
    finally:
        await conn.close()


async def _time(http: aiohttp.ClientSession, path: str, runs: int) -> dict[str, float]:
    """Milliseconds to answer ``path`` (median and slowest of ``runs``, after a warm-up)."""
    took: list[float] = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        async with http.get(path) as response:
            await response.read()
            if response.status != 200:
                raise SystemExit(f"GET {path} answered {response.status}")
        took.append((time.perf_counter() - started) * 1000)
    took = took[1:]
    return {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1)}


async def run(cfg: ConsoleBenchConfig) -> dict[str, Any]:
    from conveyor.console import Console, ConsoleConfig
    from conveyor.coordinator import Coordinator, CoordinatorConfig

    async with _postgres(cfg.dsn) as dsn:
        coordinator = Coordinator(
            CoordinatorConfig(dsn=dsn, listen="127.0.0.1:0", authentication=False)
        )
        await coordinator.start()
        try:
            _say(f"writing {cfg.tasks:,} tasks …")
            await _fill(dsn, cfg.tasks)
            config = ConsoleConfig(coordinators=coordinator.address, listen="127.0.0.1:0")
            async with Console(config) as console:
                link = console.sign_in_link(None)  # authentication is off here
                jar = aiohttp.CookieJar(unsafe=True)
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(
                    console.url, cookie_jar=jar, timeout=timeout
                ) as http:
                    async with http.get(link.removeprefix(console.url)) as response:
                        response.raise_for_status()
                    pages = await _pages(http)
                    _say("timing the pages …")
                    figures = {path: await _time(http, path, cfg.runs) for path in pages}
        finally:
            await coordinator.stop(grace=1.0)
    return {
        "tasks": cfg.tasks,
        "runs": cfg.runs,
        "pages": figures,
        "slowest_median_ms": max(f["median_ms"] for f in figures.values()),
        "machine": platform.platform(),
    }


async def _pages(http: aiohttp.ClientSession) -> list[str]:
    """The pages to time: every list with its filters, a second page, a dead task's page."""
    async with http.get("/tasks?state=DEAD") as response:
        html = await response.text()
    if 'href="/tasks/' not in html:
        raise SystemExit(f"no dead task on /tasks?state=DEAD:\n{html[:3000]}")
    dead_task = html.split('href="/tasks/', 1)[1].split('"', 1)[0]
    async with http.get("/tasks") as response:
        html = await response.text()
    second = html.split('rel="next" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    return [
        "/queues",
        "/tasks",
        second,
        "/tasks?queue=queue-3",
        "/tasks?type=type-10&state=DEAD",
        "/tasks?label=team%3Dteam-2",
        "/tasks?after=2000-01-01T00:00&before=2100-01-01T00:00",
        f"/tasks/{dead_task}",
        "/dead",
        "/schedules",
        "/workers",
    ]
