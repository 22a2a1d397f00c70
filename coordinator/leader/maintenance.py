"""The leader's sweeps: promoting due SCHEDULED tasks, reaping expired leases, releasing
dependents a race left BLOCKED, and deleting finished tasks past the retention period.

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
from conveyor.coordinator.lifecycle.transitions import (
    SCHEDULED,
    Cause,
    Transitions,
    split_released,
)
from conveyor.coordinator.store import dependencies
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
# Seconds between the dependency sweeper's rounds (a backstop for a rare race).
DEPENDENCY_SWEEP_INTERVAL = 5.0


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
    # Dependents a task set aside released or cancelled come after its own rows.
    own, _ = split_released(Cause.SET_ASIDE, rows)
    for row in own:
        _log.error(
            "task %s of tenant %r set aside (now DEAD): the %s cannot handle it (%s); the "
            "%s goes on",
            row["id"],
            row["tenant"],
            loop,
            why,
            loop,
        )
    deps.metrics.count_set_aside(loop, len(own))
    deps.after_commit.publish(Cause.SET_ASIDE, rows)
    return list(own)


class Promoter(Service):
    """Makes SCHEDULED tasks PENDING when their run_at comes."""

    name = "promoter"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self._next_due: datetime | None = None
        deps.after_commit.listen(self._on_transitions)

    def _on_transitions(self, batch: Transitions) -> None:
        run_at = batch.earliest_run_at(SCHEDULED)
        if run_at is not None:
            self.due(run_at)

    def due(self, run_at: datetime) -> None:
        """A task was scheduled for ``run_at`` (here, or on a follower: ``work_ready.py``):
        looks again now if that is earlier than the next one it knew of."""
        if self._next_due is None or run_at < self._next_due:
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
        own, _ = split_released(Cause.EXPIRED, rows)
        if own:
            self.reaped += len(own)
            _log.info("took back %d expired leases", len(own))
        self.deps.after_commit.publish(Cause.EXPIRED, rows)
        return 0.0 if len(own) == SWEEP_LIMIT else self.deps.config.reaper_interval

    async def _reap_one_by_one(self) -> list[asyncpg.Record]:
        """Reaps the expired leases one task at a time, setting aside those refused."""
        fence = self.deps.office.fence()
        async with self.deps.db.read() as conn:
            candidates = await store.expired_lease_ids(conn, SWEEP_LIMIT)
        reaped: list[asyncpg.Record] = []
        for task_id in candidates:
            async with self.deps.db.autocommit() as conn:
                try:
                    rows = await store.reap_expired(conn, 1, fence, only=task_id)
                    # The dependents each one released are published now: publish()
                    # finds them at the end of a statement's rows, not amid a list of
                    # several statements' rows.
                    own, released = split_released(Cause.EXPIRED, rows)
                    self.deps.after_commit.publish(Cause.RELEASED, released)
                    reaped += own
                except Exception as exc:
                    if not refused_row(exc):
                        raise
                    why = f"its expired lease cannot be taken back: {exc}"
                    await set_aside(self.deps, conn, self.name, [task_id], store.RUNNING, why)
        return reaped


class DependencySweeper(Service):
    """Releases the dependents a finishing statement could not see (``store/dependencies.py``:
    a submit that committed while a dependency's finishing statement ran). A backstop:
    every other release happens in the transaction that finishes the dependency."""

    name = "dependency-sweeper"

    async def step(self) -> float:
        async with self.deps.db.autocommit() as conn:
            ids = await dependencies.finished_dependencies(conn, SWEEP_LIMIT)
            rows = await dependencies.release(conn, ids)
        if rows:
            _log.info("released %d dependents of %d finished tasks late", len(rows), len(ids))
        self.deps.after_commit.publish(Cause.RELEASED, rows)
        return 0.0 if len(ids) == SWEEP_LIMIT else DEPENDENCY_SWEEP_INTERVAL


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
