"""The backlog limit: refuse submits once too many tasks are unfinished.

``max_backlog`` (off when 0) bounds the tasks not finished yet (PENDING, SCHEDULED,
RUNNING), coordinator-wide for now (the tenants work makes it per tenant). A submit that
would pass it is refused before anything is written: RESOURCE_EXHAUSTED, reason
QUOTA_EXCEEDED, a ``google.rpc.QuotaFailure`` naming the limit, and ``RetryInfo``.

Counting every submit would cost a COUNT per call, so the count is approximate: the
:class:`BacklogCounter` service counts the unfinished tasks every ``backlog_refresh``
seconds (three index-only counts over the partial indexes), and every admitted submit adds
its tasks to that figure until the next count. Completions in between are not subtracted,
so the estimate errs on the safe side, by at most one refresh interval of work.
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
        self.counted: int | None = None
        """Unfinished tasks at the last count (None before the first)."""
        self.admitted = 0
        """Tasks admitted since the last count."""

    @property
    def estimate(self) -> int:
        return (self.counted or 0) + self.admitted

    def start(self) -> None:
        if self.limit > 0:
            super().start()

    def admit(self, count: int) -> None:
        """Counts ``count`` tasks about to be submitted, or raises QuotaExceeded."""
        if self.limit <= 0:
            return
        if self.estimate + count > self.limit:
            raise QuotaExceeded(
                "max_backlog",
                f"the backlog limit is reached: about {self.estimate} unfinished tasks, "
                f"limit {self.limit} (max_backlog); this submit has {count}",
                retry_after=self.deps.config.backlog_refresh,
            )
        self.admitted += count

    async def step(self) -> float:
        async with self.deps.db.read() as conn:
            before = self.admitted
            counted = await store.count_unfinished(conn)
        # Submits admitted while counting may or may not be in the count: keep them.
        self.counted, self.admitted = counted, self.admitted - before
        return self.deps.config.backlog_refresh
