"""The per-queue backlog limit: ``max_queue_backlog`` unfinished tasks per queue of a tenant.

Beside the tenant's ``max_backlog`` (``backlog.py``), and counted the same way, per
(tenant, queue) instead of per tenant: a grouped count every ``backlog_refresh`` seconds
while the limit is set, plus the tasks admitted since, so the estimate errs high by at
most one refresh interval of finished work and never lets a burst through. A submit that
would take a queue past the limit is refused before anything is written:
RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED, a ``QuotaFailure`` naming
``max_queue_backlog``, and ``RetryInfo`` (the client waits it out by default). Per call:
one check per queue named in the call, never per task.

Every coordinator counts, for the life of its process, since every one serves submits
(as for the tenant's backlog). Until the counter has counted, a submit waits for the
count. Schedule firings are not held to this limit (they are held to
the tenant's).
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.tenancy.backlog import UnfinishedCount

Key = tuple[str, str]
"""(tenant, queue)."""


class QueueBacklogCounter(UnfinishedCount[Key]):
    name = "queue-backlog-counter"

    @property
    def limit(self) -> int:
        return self.deps.config.max_queue_backlog

    def counting(self) -> bool:
        return self.limit > 0

    async def count(self, conn: asyncpg.Connection) -> dict[Key, int]:
        return await store.unfinished_per_queue(conn)

    def admit(self, tenant: str, per_queue: Mapping[str, int]) -> None:
        """Counts a submit call's tasks per queue, or raises QuotaExceeded (counting none)
        when one queue would pass the limit; call :meth:`done` when the submit ended."""
        limit = self.limit
        for queue, count in per_queue.items():
            estimate = self.estimate((tenant, queue))
            if estimate + count > limit:
                raise QuotaExceeded(
                    "max_queue_backlog",
                    f"queue {queue!r} of tenant {tenant!r} reached its backlog limit: about "
                    f"{estimate} unfinished tasks, limit {limit} (max_queue_backlog); this "
                    f"submit has {count} for it",
                    retry_after=self.deps.config.backlog_refresh,
                )
        for queue, count in per_queue.items():
            self._enter((tenant, queue), count)

    def done(self, tenant: str, per_queue: Mapping[str, int]) -> None:
        """A submit admitted with :meth:`admit` finished (committed or not: one whose
        outcome is unknown may have committed, so all count until the next count)."""
        for queue, count in per_queue.items():
            self._leave((tenant, queue), count, committed=True)

    def withdraw(self, tenant: str, per_queue: Mapping[str, int]) -> None:
        """Takes back an admission whose submit was refused after all (it wrote nothing)."""
        for queue, count in per_queue.items():
            self._leave((tenant, queue), count, committed=False)
