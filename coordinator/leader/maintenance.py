"""The leader's sweeps: promoting due SCHEDULED tasks, reaping expired leases, and
deleting finished tasks past the retention period.

All are supervised services (``supervisor.py``) and act for all tenants, so one bad row
(written by hand: validation lets nothing like it in) must never stop them. A sweep
whose statement the store refuses for a row's values (:func:`errors.refused_row`) goes
through its candidates one by one; a row the promoter cannot compare (an infinite
``run_at``) or the reaper cannot reap is set aside (:func:`set_aside`: DEAD,
``last_error`` saying why, said once in the log and counted in
``conveyor_rows_set_aside_total``). The sweep goes on.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import refused_row
from conveyor.coordinator.lifecycle.transitions import SCHEDULED, Cause, Transitions
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service

_log = logging.getLogger("conveyor.coordinator.maintenance")

SWEEP_LIMIT = 5000
RETENTION_BATCH = 500
"""Finished tasks one retention statement deletes: small, so each transaction is short
and the sweep never competes with the hot path for long."""
RETENTION_PAUSE = 0.05
"""Seconds between two retention batches while there is more to delete."""
RETENTION_OFF_SLEEP = 60.0
# The promoter re-reads the earliest run_at at least this often, so a task scheduled by
# another process (or one whose wake-up was missed) still runs on time.
MAX_PROMOTER_SLEEP = 1.0


async def set_aside(
    deps: Deps,
    conn: asyncpg.Connection,
    loop: str,
    ids: Sequence[uuid.UUID],
    state: int,
    why: str,
) -> list[asyncpg.Record]:
    """Sets aside the tasks ``loop`` cannot handle (see the module docstring); returns
    their transitions, published."""
    rows = await store.set_aside(
        conn, ids, state, f"set aside by the {loop}: {why}", deps.office.fence()
    )
    for row in rows:
        _log.error(
            "task %s of tenant %r set aside (now DEAD): the %s cannot handle it (%s); the "
            "%s goes on",
            row["id"],
            row["tenant"],
            loop,
            why,
            loop,
        )
    deps.metrics.count_set_aside(loop, len(rows))
    deps.after_commit.publish(Cause.SET_ASIDE, rows)
    return rows


class Promoter(Service):
    """Makes SCHEDULED tasks PENDING when their run_at comes."""

    name = "promoter"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self._next_due: datetime | None = None
        deps.after_commit.listen(self._on_transitions)

    def _on_transitions(self, batch: Transitions) -> None:
        run_at = batch.earliest_run_at(SCHEDULED)
        if run_at is not None and (self._next_due is None or run_at < self._next_due):
            self._next_due = run_at
            self.wake()

    async def step(self) -> float:
        """Promotes due tasks; returns seconds until the next one is due (capped)."""
        set_aside_count = 0
        async with self.deps.db.autocommit() as conn:
            rows = await store.promote_due(conn, SWEEP_LIMIT, self.deps.office.fence())
            next_due = await store.next_run_at(conn)
            self.deps.after_commit.publish(Cause.PROMOTED, rows)
            if next_due is not None and next_due.tzinfo is None:
                # asyncpg reads an infinite run_at as a naive datetime: never due, and
                # not comparable with any time.
                unreachable = await store.unreachable_scheduled(conn, SWEEP_LIMIT)
                why = "its run_at is infinite, so it can never be due"
                set_aside_count = len(
                    await set_aside(self.deps, conn, self.name, unreachable, SCHEDULED, why)
                )
                next_due = await store.next_run_at(conn)
                if next_due is not None and next_due.tzinfo is None:
                    return 0.0  # more of them than one sweep takes
        self._next_due = next_due
        if len(rows) + set_aside_count == SWEEP_LIMIT:
            return 0.0
        if next_due is None:
            return MAX_PROMOTER_SLEEP
        wait = (next_due - datetime.now(UTC)).total_seconds()
        return max(0.0, min(MAX_PROMOTER_SLEEP, wait))


class Reaper(Service):
    """Takes back leases that expired (the worker stopped heartbeating)."""

    name = "reaper"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.reaped = 0

    async def step(self) -> float:
        try:
            async with self.deps.db.autocommit() as conn:
                rows = await store.reap_expired(conn, SWEEP_LIMIT, self.deps.office.fence())
        except Exception as exc:
            if not refused_row(exc):
                raise
            # One row the statement cannot handle refuses the whole sweep: go one by one.
            rows = await self._reap_one_by_one()
        if rows:
            self.reaped += len(rows)
            _log.info("took back %d expired leases", len(rows))
        self.deps.after_commit.publish(Cause.EXPIRED, rows)
        return 0.0 if len(rows) == SWEEP_LIMIT else self.deps.config.reaper_interval

    async def _reap_one_by_one(self) -> list[asyncpg.Record]:
        """Reaps the expired leases one task at a time, setting aside those refused."""
        fence = self.deps.office.fence()
        async with self.deps.db.read() as conn:
            candidates = await store.expired_lease_ids(conn, SWEEP_LIMIT)
        reaped: list[asyncpg.Record] = []
        for task_id in candidates:
            async with self.deps.db.autocommit() as conn:
                try:
                    reaped += await store.reap_expired(conn, 1, fence, only=task_id)
                except Exception as exc:
                    if not refused_row(exc):
                        raise
                    why = f"its expired lease cannot be taken back: {exc}"
                    await set_aside(self.deps, conn, self.name, [task_id], store.RUNNING, why)
        return reaped


class Retention(Service):
    """Deletes finished tasks older than ``retention_days`` (with their attempts), a
    batch of RETENTION_BATCH at a time, oldest first; counted per tenant in
    ``conveyor_tasks_purged_total{reason="retention"}``. Off while ``retention_days`` is 0.
    """

    name = "retention"

    async def step(self) -> float:
        config = self.deps.config
        if not config.retention_days:
            return RETENTION_OFF_SLEEP
        cutoff = datetime.now(UTC) - timedelta(days=config.retention_days)
        async with self.deps.db.autocommit() as conn:
            tenants = await store.purge_expired(conn, cutoff, RETENTION_BATCH)
        if tenants:
            self.deps.metrics.count_purged(Counter(tenants), "retention")
            _log.info("deleted %d tasks finished before %s (retention)", len(tenants), cutoff)
        return RETENTION_PAUSE if len(tenants) == RETENTION_BATCH else config.retention_interval
