"""Workers' results and heartbeats, group-committed and fenced by the leader's epoch.

A result applies only if its lease token (epoch, attempt) is current and held by the
worker that sends it; otherwise it is refused and recorded in ``refused_results``, never
applied, so a worker that lost its lease cannot overwrite a later attempt's outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg

from conveyor.coordinator.batcher import Batcher
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.watchers import TaskWatchers

REFUSED_REASON = "lease is not current: the task finished, was cancelled or was leased again"


class ResultRecorder:
    def __init__(
        self,
        pool: asyncpg.Pool,
        watchers: TaskWatchers,
        *,
        fence: Callable[[], Fence],
        lease_seconds: float,
        max_batch: int,
        max_pending: int,
        on_scheduled: Callable[[datetime], None],
    ) -> None:
        self._pool = pool
        self._watchers = watchers
        self._fence = fence
        self._lease_seconds = lease_seconds
        self._on_scheduled = on_scheduled
        # One item per worker message (a list of results or leases), so a message costs
        # one future however many results it carries.
        self.results: Batcher[Sequence[store.Outcome], list[bool]] = Batcher(
            "result",
            self._flush_results,
            max_batch=max_batch,
            max_pending=max_pending,
            concurrency=2,
        )
        self.renewals: Batcher[Sequence[store.LeaseRef], list[bool]] = Batcher(
            "renewal", self._flush_renewals, max_batch=max_batch, max_pending=max_pending
        )

    def start(self) -> None:
        self.results.start()
        self.renewals.start()

    async def stop(self) -> None:
        await self.results.stop()
        await self.renewals.stop()

    async def _flush_results(self, messages: Sequence[Sequence[store.Outcome]]) -> list[list[bool]]:
        outcomes = [o for message in messages for o in message]
        fence = self._fence()
        # One statement applies every result and records the attempts, fence included;
        # the rare refusals are recorded after it (they change no task).
        async with self._pool.acquire() as conn:
            with leadership.fencing(fence):
                applied_rows = await store.finish_attempts(conn, outcomes, fence)
            applied = {r["id"] for r in applied_rows}
            refused = [o for o in outcomes if o.lease.task_id not in applied]
            if refused:
                await store.record_refused(conn, refused, REFUSED_REASON)
        self._watchers.changed(applied)
        for row in applied_rows:
            if row["state"] == store.SCHEDULED:
                self._on_scheduled(row["run_at"])
        return [[o.lease.task_id in applied for o in message] for message in messages]

    async def _flush_renewals(
        self, messages: Sequence[Sequence[store.LeaseRef]]
    ) -> list[list[bool]]:
        leases = [x for message in messages for x in message]
        fence = self._fence()
        async with self._pool.acquire() as conn:
            with leadership.fencing(fence):
                renewed = await store.renew_leases(conn, leases, self._lease_seconds, fence)
        return [[(x.task_id, x.attempt) in renewed for x in message] for message in messages]
