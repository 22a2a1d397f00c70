"""The leader's sweeps: promoting due SCHEDULED tasks and reaping expired leases.

Both are supervised services (``supervisor.py``) and act for all tenants.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.lifecycle.transitions import SCHEDULED, Cause, Transitions
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service

_log = logging.getLogger("conveyor.coordinator.maintenance")

SWEEP_LIMIT = 5000
# The promoter re-reads the earliest run_at at least this often, so a task scheduled by
# another process (or one whose wake-up was missed) still runs on time.
MAX_PROMOTER_SLEEP = 1.0


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
        async with self.deps.db.autocommit() as conn:
            rows = await store.promote_due(conn, SWEEP_LIMIT, self.deps.office.fence())
            next_due = await store.next_run_at(conn)
        self.deps.after_commit.publish(Cause.PROMOTED, rows)
        self._next_due = next_due
        if len(rows) == SWEEP_LIMIT:
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
        async with self.deps.db.autocommit() as conn:
            rows = await store.reap_expired(conn, SWEEP_LIMIT, self.deps.office.fence())
        if rows:
            self.reaped += len(rows)
            _log.info("took back %d expired leases", len(rows))
        self.deps.after_commit.publish(Cause.EXPIRED, rows)
        return 0.0 if len(rows) == SWEEP_LIMIT else self.deps.config.reaper_interval
