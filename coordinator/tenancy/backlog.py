"""The backlog count behind each tenant's ``max_backlog``: unfinished tasks per tenant.

A tenant's ``max_backlog`` (``quotas.py``; the coordinator's ``max_backlog`` is every
tenant's default) bounds its tasks not finished yet (PENDING, SCHEDULED, RUNNING). A
submit that would pass it is refused before anything is written: RESOURCE_EXHAUSTED,
reason QUOTA_EXCEEDED, a ``google.rpc.QuotaFailure`` naming ``max_backlog``, and
``RetryInfo``.

Counting every submit would cost a COUNT per call, so the count is approximate, and errs
on the safe side: the :class:`BacklogCounter` service counts the unfinished tasks of
every tenant every ``backlog_refresh`` seconds (one grouped count; only while some tenant
has a backlog limit); submits admitted since are added to that figure, those still in
flight and those committed after the count began alike. Completions in between are not
subtracted, so the estimate is high by at most one refresh interval of finished work.
The bookkeeping is per call (a batch counts once), never per task.

Every coordinator serves submits (followers too), so every coordinator counts, for the
life of its process: the count covers every coordinator's committed tasks, the additions
since only its own. Submits other coordinators admitted since the last count are
missing from a coordinator's estimate, so with clients spread over several replicas a
tenant may pass its limit by what the others admitted within one refresh interval.

Until the counter has counted, the figure is empty: right after this coordinator
started, and right after a first backlog limit was set (nothing is counted while no
tenant has one). A submit or a firing of a limited tenant then waits
for the count (:meth:`BacklogCounter.ready`, which starts it at once) instead of being
admitted against nothing; without the wait, a tenant could add a refresh interval's
worth of submits past its limit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.store import tenants as store
from conveyor.coordinator.supervisor import Service


class BacklogCounter(Service):
    name = "backlog-counter"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.limited: Callable[[], bool] = lambda: deps.config.max_backlog > 0
        """Whether some tenant has a backlog limit (``Quotas`` sets it): else nothing is
        counted."""
        self.counted: dict[str, int] = {}
        """Unfinished tasks per tenant at the last count."""
        self.in_flight: collections.Counter[str] = collections.Counter()
        """Tasks admitted whose submit has not finished, per tenant."""
        self.committed: collections.Counter[str] = collections.Counter()
        """Tasks whose submit finished since the last count began, per tenant."""
        self.current = False
        """Whether ``counted`` is a count taken while some tenant had a backlog limit, since
        this counter started (else the estimate knows nothing of older tasks)."""

    async def ready(self) -> None:
        """Returns once the count is current, counting at once if it is not (the caller
        bounds the wait)."""
        if not self.current:
            self.wake()
            await self.wait_until(lambda counter: counter.current)

    async def stop(self) -> None:
        await super().stop()
        self.current = False  # started again, it counts again before trusting the figure

    def estimate(self, tenant: str) -> int:
        return self.counted.get(tenant, 0) + self.committed[tenant] + self.in_flight[tenant]

    def check(self, tenant: str, count: int, limit: int) -> None:
        """Raises QuotaExceeded when ``count`` more tasks would take ``tenant`` past
        ``limit`` (0: no limit)."""
        if limit <= 0:
            return
        estimate = self.estimate(tenant)
        if estimate + count > limit:
            raise QuotaExceeded(
                "max_backlog",
                f"tenant {tenant!r} reached its backlog limit: about {estimate} unfinished "
                f"tasks, limit {limit} (max_backlog); this submit has {count}",
                retry_after=self.deps.config.backlog_refresh,
            )

    def admit(self, tenant: str, count: int, limit: int = 0) -> None:
        """Counts ``count`` tasks of ``tenant`` about to be submitted, after :meth:`check`
        against ``limit``; call :meth:`done` when the submit has finished."""
        self.check(tenant, count, limit)
        self.in_flight[tenant] += count

    def done(self, tenant: str, count: int) -> None:
        """A submit admitted with :meth:`admit` finished (committed or not: a submit whose
        outcome is unknown may have committed, so all count until the next count)."""
        self.in_flight[tenant] -= count
        if not self.in_flight[tenant]:
            del self.in_flight[tenant]
        self.committed[tenant] += count

    async def step(self) -> float:
        refresh = self.deps.config.backlog_refresh
        if not self.limited():
            # Nothing to enforce: forget, and count again once some tenant has a limit.
            self.counted = {}
            self.committed.clear()
            self.current = False
            return refresh
        # Submits that finished before the count began are in it; later ones may not be.
        committed_before = collections.Counter(self.committed)
        async with self.deps.db.read() as conn:
            counted = await store.unfinished_per_tenant(conn)
        self.counted = counted
        self.committed -= committed_before
        self.current = True
        return refresh
