"""Hands ready tasks to workers that have credit.

One loop, woken when work may have appeared (a submit or promotion committed, a lease was
taken back) or a worker granted credit, and by a slow timer as a safety net. Each round
claims for every session with credit in one transaction (group commit for claims),
checking the leader's epoch in that transaction, then pushes the assignments after commit.
Postgres is the queue: nothing about dispatch lives only in memory, so a new leader
rebuilds nothing but its session list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from conveyor.coordinator import convert
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.sessions import SessionRegistry, WorkerSession
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.watchers import TaskWatchers
from conveyor.v1 import worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.dispatcher")

# At most this many tasks go to one session per round, so one greedy worker cannot
# stall a round's transaction; the next round follows at once.
MAX_CLAIM_PER_SESSION = 500


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sessions: SessionRegistry,
        watchers: TaskWatchers,
        *,
        fence: Callable[[], Fence],
        lease_seconds: float,
        poll_interval: float,
        on_fenced: Callable[[Fenced], None],
    ) -> None:
        self._pool = pool
        self._sessions = sessions
        self._watchers = watchers
        self._fence = fence
        self._lease_seconds = lease_seconds
        self._poll_interval = poll_interval
        self._on_fenced = on_fenced
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dispatched = 0

    def take_idle(self, tenant: str, queue: str, task_type: str) -> WorkerSession | None:
        """A starving session that takes this kind of task, with one credit reserved for it.

        For the submit hand-off; the caller returns the credit with ``give_back`` if the
        task does not reach the session after all.
        """
        if self._task is None or self._task.done():
            return None  # not leading (or fenced)
        for session in self._sessions.wanting_work():
            if (
                session.starving
                and session.tenant == tenant
                and queue in session.queues
                and (not session.task_types or task_type in session.task_types)
            ):
                session.credit -= 1
                return session
        return None

    def give_back(self, session: WorkerSession, credits: int) -> None:
        session.credit += credits
        self._wakeup.set()

    async def deliver(
        self, session: WorkerSession, assignments: list[worker_service_pb2.Assignment]
    ) -> None:
        """Pushes assignments whose credit was already reserved."""
        self.dispatched += len(assignments)
        await session.send(
            worker_service_pb2.ConnectResponse(
                assignments=worker_service_pb2.Assignments(assignments=assignments)
            )
        )

    def wake(self, tenant: str | None = None, queue: str | None = None) -> None:
        """Says work may be ready. The queue is not used: one round serves every session,
        and the callback signature is shared with the other ``on_ready`` hooks."""
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
            self._wakeup.clear()
            ready = self._sessions.wanting_work()
            if not ready:
                continue
            try:
                more = await self._round(ready)
                failures = 0
            except Fenced as exc:
                self._on_fenced(exc)
                return
            except Exception as exc:
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                if isinstance(
                    exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | TimeoutError
                ):
                    _log.warning("dispatch round failed (%s); retrying in %.2fs", exc, delay)
                else:  # a bug, not an outage: say so loudly, but keep dispatching
                    _log.exception("dispatch round crashed; retrying in %.2fs", delay)
                await asyncio.sleep(delay)
                self._wakeup.set()
                continue
            if more:
                self._wakeup.set()

    async def _round(self, ready: list[WorkerSession]) -> bool:
        """Claims for each session; True when some session got all it asked (more may wait)."""
        fence = self._fence()
        claims: list[tuple[WorkerSession, list[asyncpg.Record]]] = []
        full = False
        # One statement per session, each carrying its own fence check; no transaction
        # around them, so a round costs one round trip per session with credit. Credit is
        # reserved before each claim (a submit hand-off may take some meanwhile) and what
        # the claim did not use is given back.
        async with self._pool.acquire() as conn:
            for session in ready:
                want = min(session.credit, MAX_CLAIM_PER_SESSION)
                if want <= 0:
                    continue
                session.credit -= want
                try:
                    with leadership.fencing(fence):
                        rows = await store.claim(
                            conn,
                            tenant=session.tenant,
                            queues=session.queues,
                            types=session.task_types,
                            limit=want,
                            worker_id=session.worker_id,
                            fence=fence,
                            lease_seconds=self._lease_seconds,
                        )
                except BaseException:
                    session.credit += want
                    raise
                session.credit += want - len(rows)
                session.starving = len(rows) < want
                if rows:
                    claims.append((session, rows))
                    full = full or len(rows) == want
        for session, rows in claims:
            self.dispatched += len(rows)
            message = worker_service_pb2.ConnectResponse(
                assignments=worker_service_pb2.Assignments(
                    assignments=[convert.assignment_from_row(r) for r in rows]
                )
            )
            # A session that closed meanwhile keeps its leases until they expire or the
            # worker reconnects without them; either way the tasks come back.
            await session.send(message)
            self._watchers.changed(r["id"] for r in rows)
        return full
