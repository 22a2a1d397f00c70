"""The backlog limit: refuse submits once too many tasks are unfinished.

``max_backlog`` (off when 0) bounds the tasks not finished yet (PENDING, SCHEDULED,
RUNNING), coordinator-wide for now (the tenants work makes it per tenant). A submit that
would pass it is refused before anything is written: RESOURCE_EXHAUSTED, reason
QUOTA_EXCEEDED, a ``google.rpc.QuotaFailure`` naming the limit, and ``RetryInfo``.

Counting every submit would cost a COUNT per call, so the count is approximate, and errs
on the safe side: the :class:`BacklogCounter` service counts the unfinished tasks every
``backlog_refresh`` seconds (three index-only counts over the partial indexes); submits
admitted since are added to that figure, those still in flight and those committed after
the count began alike. Completions in between are not subtracted, so the estimate is
high by at most one refresh interval of finished work.
"""

from __future__ import annotations

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service


class BacklogCounter(Service):
    name = "backlog-counter"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.limit = deps.config.max_backlog
        self.counted = 0
        """Unfinished tasks at the last count."""
        self.in_flight = 0
        """Tasks admitted whose submit has not finished."""
        self.committed = 0
        """Tasks whose submit finished since the last count began."""

    @property
    def estimate(self) -> int:
        return self.counted + self.committed + self.in_flight

    def start(self) -> None:
        if self.limit > 0:
            super().start()

    def admit(self, count: int) -> None:
        """Counts ``count`` tasks about to be submitted, or raises QuotaExceeded; call
        :meth:`done` when the submit has finished."""
        if self.limit <= 0:
            return
        if self.estimate + count > self.limit:
            raise QuotaExceeded(
                "max_backlog",
                f"the backlog limit is reached: about {self.estimate} unfinished tasks, "
                f"limit {self.limit} (max_backlog); this submit has {count}",
                retry_after=self.deps.config.backlog_refresh,
            )
        self.in_flight += count

    def done(self, count: int) -> None:
        """A submit admitted with :meth:`admit` finished (committed or not: a submit whose
        outcome is unknown may have committed, so all count until the next count)."""
        if self.limit <= 0:
            return
        self.in_flight -= count
        self.committed += count

    async def step(self) -> float:
        # Submits that finished before the count began are in it; later ones may not be.
        committed_before = self.committed
        async with self.deps.db.read() as conn:
            counted = await store.count_unfinished(conn)
        self.counted = counted
        self.committed -= committed_before
        return self.deps.config.backlog_refresh
