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

import abc
import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import asyncpg

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.store import tenants as store
from conveyor.coordinator.supervisor import Service

K = TypeVar("K", bound=Hashable)


class UnfinishedCount(Service, Generic[K], abc.ABC):
    """Unfinished tasks per key (a tenant, or a tenant's queue), as described above: the
    last grouped count plus what was admitted since. The per-tenant and the per-queue
    limits share it; they differ in the key and in the query."""

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.counted: dict[K, int] = {}
        """Unfinished tasks per key at the last count."""
        self.in_flight: collections.Counter[K] = collections.Counter()
        """Tasks admitted whose submit has not finished, per key."""
        self.committed: collections.Counter[K] = collections.Counter()
        """Tasks whose submit finished since the last count began, per key."""
        self.current = False
        """Whether ``counted`` is a count taken while a limit was set, since this counter
        started (else the estimate knows nothing of older tasks)."""

    @abc.abstractmethod
    def counting(self) -> bool:
        """Whether some limit is set (else nothing is counted)."""

    @abc.abstractmethod
    async def count(self, conn: asyncpg.Connection) -> dict[K, int]:
        """The grouped count of unfinished tasks."""

    async def ready(self) -> None:
        """Returns once the count is current, counting at once if it is not (the caller
        bounds the wait)."""
        if not self.current:
            self.wake()
            await self.wait_until(lambda counter: counter.current)

    async def stop(self) -> None:
        await super().stop()
        self.current = False  # started again, it counts again before trusting the figure

    def estimate(self, key: K) -> int:
        return self.counted.get(key, 0) + self.committed[key] + self.in_flight[key]

    def _enter(self, key: K, count: int) -> None:
        self.in_flight[key] += count

    def _leave(self, key: K, count: int, committed: bool) -> None:
        self.in_flight[key] -= count
        if not self.in_flight[key]:
            del self.in_flight[key]
        if committed:
            self.committed[key] += count

    async def step(self) -> float:
        refresh = self.deps.config.backlog_refresh
        if not self.counting():
            # Nothing to enforce: forget, and count again once a limit is set.
            self.counted = {}
            self.committed.clear()
            self.current = False
            return refresh
        # Submits that finished before the count began are in it; later ones may not be.
        committed_before = collections.Counter(self.committed)
        async with self.deps.db.read() as conn:
            counted = await self.count(conn)
        self.counted = counted
        self.committed -= committed_before
        self.current = True
        return refresh


class BacklogCounter(UnfinishedCount[str]):
    name = "backlog-counter"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.limited: Callable[[], bool] = lambda: deps.config.max_backlog > 0
        """Whether some tenant has a backlog limit (``Quotas`` sets it): else nothing is
        counted."""

    def counting(self) -> bool:
        return self.limited()

    async def count(self, conn: asyncpg.Connection) -> dict[str, int]:
        return await store.unfinished_per_tenant(conn)

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
        self._enter(tenant, count)

    def done(self, tenant: str, count: int) -> None:
        """A submit admitted with :meth:`admit` finished (committed or not: a submit whose
        outcome is unknown may have committed, so all count until the next count)."""
        self._leave(tenant, count, committed=True)
