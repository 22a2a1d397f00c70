"""The leader's schedule firer: one loop fires every due schedule, in batches.

There is no timer per schedule. Each round locks a batch of due schedules (``wake_time``
<= now, by index, earliest first), decides what each fires (:func:`cron.plan`), inserts
every firing of the batch with one multi-row insert and moves every cursor with one
update, all in one transaction that first checks the leader's epoch. Then it wakes the
dispatcher for the queues that got work, and sleeps until the earliest ``wake_time``
(at most ``max_sleep``; :meth:`ScheduleFirer.wake` cuts the sleep short when a client
creates, changes or resumes a schedule).

Exactly once per tick: a firing's task has the idempotency key
``schedule:<schedule id>:<tick, UTC ISO 8601>`` and is inserted in the transaction that
moves the cursor past the tick. A crash before the commit leaves neither; after it, both.
A coordinator fenced off by a newer epoch fails its check and writes nothing, and the key
(ON CONFLICT DO NOTHING) turns any second insert of a tick into a no-op regardless.

Parsed expressions and templates are cached per schedule (keyed by its version), so a
round costs, per firing, a few microseconds of tick arithmetic and one row in each of
two statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from conveyor.coordinator.cron import (
    CronSpec,
    Plan,
    ScheduleState,
    compile_cron,
    plan,
    utc_now,
)
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.schedule_validation import template_task
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import schedules as store
from conveyor.coordinator.store import tasks as task_store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.validation import NewTask

_log = logging.getLogger("conveyor.coordinator.schedules")

# Entries of the per-schedule cache beyond which it is dropped (deleted schedules linger).
_MAX_CACHED = 200_000


def idempotency_key(schedule_id: uuid.UUID, tick: datetime) -> str:
    """The key of a tick's task: ``schedule:<id>:<tick as UTC ISO 8601>``."""
    utc = tick.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return f"schedule:{schedule_id}:{utc:%Y-%m-%dT%H:%M:%S}{fraction}Z"


@dataclass(frozen=True)
class _Compiled:
    version: int
    spec: CronSpec
    task: NewTask


@dataclass
class _Firing:
    tenant: str
    schedule_id: uuid.UUID
    tick: datetime
    task_id: uuid.UUID
    task: NewTask


class ScheduleFirer:
    """Fires due schedules while this coordinator leads.

    Args:
        fence: The leader's fencing token, checked in every firing transaction.
        on_ready: Called with (tenant, queue) after a commit put tasks on the queue.
        on_fenced: Called once when a newer epoch fenced this coordinator off; the firer
            has stopped by then.
        now: The clock (an aware UTC datetime), injectable for tests.
        batch_size: Schedules locked and fired per transaction.
        max_sleep: Longest sleep between rounds, so schedules written by anything other
            than this coordinator's API are still noticed.
        misfire_grace: Ticks due more than this many seconds before the firer started are
            *missed* and follow the schedule's catch-up policy.
        buffer_recheck: How often a schedule with a buffered tick checks whether its
            previous firing has finished.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        fence: Callable[[], Fence],
        on_ready: Callable[[str, str], None],
        on_fenced: Callable[[Fenced], None],
        now: Callable[[], datetime] = utc_now,
        batch_size: int = 2000,
        max_sleep: float = 1.0,
        misfire_grace: float = 1.0,
        buffer_recheck: float = 0.5,
    ) -> None:
        self._pool = pool
        self._fence = fence
        self._on_ready = on_ready
        self._on_fenced = on_fenced
        self.now = now
        self.batch_size = batch_size
        self.max_sleep = max_sleep
        self.misfire_grace = timedelta(seconds=misfire_grace)
        self.buffer_recheck = timedelta(seconds=buffer_recheck)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cache: dict[uuid.UUID, _Compiled] = {}
        self.started: datetime | None = None
        self.fired = 0
        """Tasks submitted since start (for tests and metrics)."""

    @property
    def missed_before(self) -> datetime:
        """Ticks before this instant were missed: they fell due well before the firer started."""
        started = self.started or self.now()
        return started - self.misfire_grace

    def start(self) -> None:
        """Starts the loop; call after taking office."""
        self.started = self.now()
        self._task = asyncio.create_task(self._loop(), name="schedule-firer")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def wake(self) -> None:
        """Makes the loop look for due schedules now (one was created, changed or resumed)."""
        self._wakeup.set()

    async def _loop(self) -> None:
        failures = 0
        while True:
            self._wakeup.clear()
            try:
                delay = await self.run_once()
                failures = 0
            except Fenced as exc:
                self._task = None
                self._on_fenced(exc)
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                _log.warning("firing schedules failed (%s); retrying in %.1fs", exc, delay)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
            else:
                await asyncio.sleep(0)  # let the rest of the coordinator run between batches

    async def run_once(self) -> float:
        """Fires one batch of due schedules; returns how long to sleep before the next."""
        now = self.now()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                rows = await store.due(conn, now, self.batch_size)
                if rows:
                    firings = await self._fire(conn, rows, now)
            if len(rows) == self.batch_size:
                return 0.0
            wake = await store.next_wake(conn)
        if rows:
            self._announce(firings)
        if wake is None:
            return self.max_sleep
        # Rows locked by a client's transaction are due but were skipped: look again soon.
        return max(0.005, min(self.max_sleep, (wake - self.now()).total_seconds()))

    async def _fire(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record], now: datetime
    ) -> list[_Firing]:
        await self._compile(conn, rows)
        missed_before = self.missed_before
        firings: list[_Firing] = []
        planned: list[tuple[asyncpg.Record, Plan, list[_Firing]]] = []
        missed = 0
        for row in rows:
            compiled = self._cache[row["id"]]
            decided = plan(
                compiled.spec,
                ScheduleState(
                    next_fire_time=row["next_fire_time"],
                    overlap_policy=row["overlap_policy"],
                    catch_up_policy=row["catch_up_policy"],
                    catch_up_limit=row["catch_up_limit"],
                    end_time=row["end_time"],
                    buffered_tick=row["buffered_tick"],
                    previous_unfinished=row["previous_unfinished"],
                ),
                now,
                missed_before,
            )
            missed += decided.missed
            mine = [
                _Firing(row["tenant"], row["id"], tick, uuid7(), compiled.task)
                for tick in decided.fire
            ]
            firings.extend(mine)
            planned.append((row, decided, mine))
        if missed:
            _log.info("%d schedules had missed ticks; their catch-up policies applied", missed)
        if firings:
            await self._insert(conn, firings, now)
        recheck = now + self.buffer_recheck
        fired_at = now.isoformat()
        await store.advance(
            conn,
            [_advance(row, decided, mine, recheck, fired_at) for row, decided, mine in planned],
        )
        return firings

    async def _insert(
        self, conn: asyncpg.Connection, firings: list[_Firing], now: datetime
    ) -> None:
        """Inserts the firings' tasks; a firing whose key is taken gets the existing task's id."""
        rows = []
        keys: dict[tuple[str, str], _Firing] = {}
        for f in firings:
            key = idempotency_key(f.schedule_id, f.tick)
            keys[(f.tenant, key)] = f
            # No request hash: a client resending with this key is not sending our request.
            task = dataclasses.replace(f.task, idempotency_key=key)
            rows.append((f.tenant, f.task_id, task, task_store.PENDING, f.tick))
        inserted = await task_store.insert(conn, rows, now)
        if len(inserted) == len(rows):
            return
        # Only a client submitting with a key of this format, or a writer that escaped
        # fencing, can have taken one.
        taken = [k for k, f in keys.items() if f.task_id not in inserted]
        existing = await task_store.find_by_idempotency_keys(conn, taken)
        for k in taken:
            if k in existing:
                keys[k].task_id = existing[k]["id"]
        _log.warning("%d schedule ticks had tasks already; not fired again", len(taken))

    async def _compile(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
        stale = [
            r["id"]
            for r in rows
            if (c := self._cache.get(r["id"])) is None or c.version != r["version"]
        ]
        if not stale:
            return
        if len(self._cache) + len(stale) > _MAX_CACHED:
            self._cache.clear()
            stale = [r["id"] for r in rows]
        by_id = {r["id"]: r for r in rows}
        for t in await store.templates(conn, stale):
            row = by_id[t["id"]]
            self._cache[t["id"]] = _Compiled(
                version=row["version"],
                spec=compile_cron(row["cron"], row["time_zone"]),
                task=template_task(t["template"]),
            )

    def _announce(self, firings: list[_Firing]) -> None:
        self.fired += len(firings)
        for tenant, queue in {(f.tenant, f.task.queue) for f in firings}:
            self._on_ready(tenant, queue)


def _advance(
    row: asyncpg.Record, decided: Plan, mine: list[_Firing], recheck: datetime, fired_at: str
) -> store.Advance:
    wake = decided.next_fire_time
    if decided.buffered_tick is not None and (wake is None or recheck < wake):
        wake = recheck  # look again soon: the previous firing may finish any time
    return store.Advance(
        id=row["id"],
        next_fire_time=decided.next_fire_time,
        wake_time=wake,
        buffered_tick=decided.buffered_tick,
        last_task_id=mine[-1].task_id if mine else None,
        firings=_firings_json(mine, fired_at) if mine else None,
    )


def _firings_json(mine: list[_Firing], fired_at: str) -> str:
    """New recent_firings entries, newest first."""
    entries = [
        f'{{"tick":"{f.tick.isoformat()}","task":"{f.task_id}","fired":"{fired_at}"}}'
        for f in reversed(mine)
    ]
    return "[" + ",".join(entries) + "]"
