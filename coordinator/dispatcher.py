"""Hands ready tasks to workers that have credit.

One supervised service (``supervisor.py``), woken when work may have appeared (a submit,
promotion or release committed), when a worker granted credit, and by a slow timer as a
safety net. A round follows the dispatch policy (``dispatch_policy.py``): for each
session in its plan, one fenced claim statement, then the claimed tasks go into that
session's outbox at once, before the next claim. So a claim that fails loses nothing
claimed before it, and the failing session's reserved credit is given back; pushing
never waits for a worker. Claimed tasks whose session ended before they could be queued
go back at once without using an attempt.

Postgres is the queue: nothing about dispatch lives only in memory, so a new leader
rebuilds nothing but its session list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch_policy import DispatchPolicy, Packed
from conveyor.coordinator.leases import LeaseKey
from conveyor.coordinator.maintenance import set_aside
from conveyor.coordinator.sessions import WorkerSession
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.telemetry import dispatch_spans

_log = logging.getLogger("conveyor.coordinator.dispatcher")

UNDELIVERED = store.Release(
    store.OUTCOME_NOT_STARTED,
    False,
    "never started: the stream to worker %s ended before the task was sent",
)


class Dispatcher(Service):
    name = "dispatcher"

    def __init__(self, deps: Deps, policy: DispatchPolicy) -> None:
        super().__init__(deps)
        self.policy = policy
        self.dispatched = 0
        self._wake_soon = False
        deps.events.on_ready(self._on_ready)

    def _on_ready(self, tenant: str, queue: str) -> None:
        # One round serves every session, so the queue does not narrow it. The wake waits
        # one turn of the event loop, so the callers whose commit announced the work are
        # answered first: woken at once, the round's claim went out ahead of their answers,
        # and on a small machine sending it can hand the CPU to PostgreSQL for most of a
        # millisecond (a lone submit took 1 ms longer, measured with raw SubmitTask calls).
        if not self._wake_soon:
            self._wake_soon = True
            asyncio.get_running_loop().call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_soon = False
        self.wake()

    async def step(self) -> float:
        claims = self.policy.plan(self.deps.sessions)
        if not claims:
            return self.deps.config.poll_interval
        fence = self.deps.office.fence()
        metrics, tracing = self.deps.metrics, self.deps.tracing
        more = False
        async with self.deps.db.read() as conn:
            for claim in claims:
                session = claim.session
                # Reserved before the claim: a submit hand-off may take credit meanwhile.
                session.credit -= claim.limit
                started, started_ns = time.perf_counter(), time.time_ns()
                try:
                    rows = await self.policy.claim(conn, claim, fence)
                except BaseException:
                    session.credit += claim.limit
                    raise
                session.credit += claim.limit - len(rows)
                full = self.policy.filled(claim, rows)
                # Nothing more waiting for it: a fresh submit may be handed to it directly.
                session.starving = not full
                if rows:
                    more = more or full
                    if metrics is not None:
                        metrics.record_flush("claim", len(rows), time.perf_counter() - started)
                        metrics.record_dispatched(rows)
                    try:
                        messages = self.policy.pack(rows)
                    except Exception:
                        rows = await self._set_aside_unusable(conn, session, rows)
                        messages = self.policy.pack(rows)
                    if tracing.enabled:
                        dispatch_spans(tracing, rows, messages, started_ns)
                    await self.deliver(conn, session, messages)
                    self.deps.watchers.changed(r["id"] for r in rows)
        return 0.0 if more else self.deps.config.poll_interval

    async def _set_aside_unusable(
        self, conn: asyncpg.Connection, session: WorkerSession, rows: list[asyncpg.Record]
    ) -> list[asyncpg.Record]:
        """Sets aside the claimed rows no Assignment can carry (one bad row never stops
        the dispatcher, nor the rows claimed with it); returns the others."""
        bad = self.policy.unusable(rows)
        for i, exc in bad.items():
            why = f"it cannot be sent to a worker: {type(exc).__name__}: {exc}"
            await set_aside(self.deps, conn, self.name, [rows[i]["id"]], store.RUNNING, why)
        session.credit += len(bad)
        self.deps.watchers.changed(rows[i]["id"] for i in bad)
        return [row for i, row in enumerate(rows) if i not in bad]

    async def deliver(
        self, conn: asyncpg.Connection, session: WorkerSession, messages: Sequence[Packed]
    ) -> None:
        """Queues assignments whose credit was reserved; gives back what cannot be sent."""
        undelivered: list[LeaseKey] = []
        for packed in messages:
            if session.push(packed.message, size=packed.size, assignments=True):
                self.dispatched += packed.count
            else:
                undelivered.extend(session.assigned(packed.message))
        if undelivered:
            await release_undelivered(self.deps, conn, undelivered)


async def release_undelivered(deps: Deps, conn: asyncpg.Connection, keys: list[LeaseKey]) -> None:
    """Puts leases that never reached their worker back to PENDING, not counted."""
    released = await store.release_leases(conn, keys, UNDELIVERED, deps.office.fence())
    if released:
        _log.info("took back %d tasks that never reached their worker", len(released))
        if deps.metrics is not None:
            deps.metrics.record_requeued(released)
        deps.watchers.changed(r["id"] for r in released)
        for tenant, queue in {(r["tenant"], r["queue"]) for r in released}:
            deps.events.ready(tenant, queue)
