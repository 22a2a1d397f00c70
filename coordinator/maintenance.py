"""The leader's background sweeps: promoting due SCHEDULED tasks and reaping expired leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.watchers import TaskWatchers

_log = logging.getLogger("conveyor.coordinator.maintenance")

SWEEP_LIMIT = 5000
# The promoter re-reads the earliest run_at at least this often, so a task scheduled by
# another process (or one whose wake-up was missed) still runs on time.
MAX_PROMOTER_SLEEP = 1.0


class Maintenance:
    def __init__(
        self,
        pool: asyncpg.Pool,
        watchers: TaskWatchers,
        *,
        fence: Callable[[], Fence],
        reaper_interval: float,
        on_ready: Callable[[str, str], None],
        on_fenced: Callable[[Fenced], None],
    ) -> None:
        self._pool = pool
        self._watchers = watchers
        self._fence = fence
        self._reaper_interval = reaper_interval
        self._on_ready = on_ready
        self._on_fenced = on_fenced
        self._promote_wakeup = asyncio.Event()
        self._next_due: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0

    def scheduled(self, run_at: datetime) -> None:
        """Says a task became SCHEDULED for ``run_at``; wakes the promoter if that is sooner."""
        if self._next_due is None or run_at < self._next_due:
            self._next_due = run_at
            self._promote_wakeup.set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._loop("promoter", self._promote, self._promote_wakeup), name="promoter"
            ),
            asyncio.create_task(self._loop("reaper", self._reap, asyncio.Event()), name="reaper"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(
        self, name: str, step: Callable[[], Awaitable[float]], wakeup: asyncio.Event
    ) -> None:
        """Runs ``step`` forever; it returns how long to sleep, cut short by ``wakeup``."""
        failures = 0
        while True:
            try:
                delay = await step()
                failures = 0
            except Fenced as exc:
                self._on_fenced(exc)
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                _log.warning("%s sweep failed (%s); retrying in %.1fs", name, exc, delay)
            except Exception:
                # A bug, not an outage: say so loudly, but keep sweeping.
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                _log.exception("%s sweep crashed; retrying in %.1fs", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), delay)
            wakeup.clear()

    async def _promote(self) -> float:
        """Promotes due tasks; returns seconds until the next one is due (capped)."""
        fence = self._fence()
        async with self._pool.acquire() as conn:
            with leadership.fencing(fence):
                rows = await store.promote_due(conn, SWEEP_LIMIT, fence)
            next_due = await store.next_run_at(conn)
        self._announce(rows)
        self._next_due = next_due
        if len(rows) == SWEEP_LIMIT:
            return 0.0
        if next_due is None:
            return MAX_PROMOTER_SLEEP
        wait = (next_due - datetime.now(UTC)).total_seconds()
        return max(0.0, min(MAX_PROMOTER_SLEEP, wait))

    async def _reap(self) -> float:
        fence = self._fence()
        async with self._pool.acquire() as conn:
            with leadership.fencing(fence):
                rows = await store.reap_expired(conn, SWEEP_LIMIT, fence)
        if rows:
            self.reaped += len(rows)
            _log.info("took back %d expired leases", len(rows))
        self._announce(rows)
        return 0.0 if len(rows) == SWEEP_LIMIT else self._reaper_interval

    def _announce(self, rows: list[asyncpg.Record]) -> None:
        if not rows:
            return
        self._watchers.changed(r["id"] for r in rows)
        for tenant, queue in {(r["tenant"], r["queue"]) for r in rows}:
            self._on_ready(tenant, queue)
