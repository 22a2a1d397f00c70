"""Hands ready tasks to workers that have credit: where every lease begins.

One supervised service (``supervisor.py``), woken when work became ready (an after-commit
listener: a submit, promotion or release committed), when a worker granted credit, and
by a slow timer as a safety net. A round follows the dispatch policy (``policy.py``): for
each session in its plan, one fenced claim statement, then the claimed tasks go into that
session's outbox at once, before the next claim. So a claim that fails loses nothing
claimed before it, and the failing session's reserved credit is given back; pushing
never waits for a worker. Claimed tasks whose session ended before they could be queued
go back at once without using an attempt.

The other way a lease begins is the hand-off (:meth:`Dispatcher.reserve`,
:meth:`Dispatcher.hand_off`): a small submit of tasks ready now, with a starving worker
for each, is inserted already leased to them in the statement that commits it, and
queued to them at once.

Postgres is the queue: nothing about dispatch lives only in memory, so a new leader
rebuilds nothing but its session list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.coordinator import convert
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch import policy as dispatch_policy
from conveyor.coordinator.dispatch.policy import DispatchPolicy, Packed
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.coordinator.lifecycle.leases import LeaseKey, Leases
from conveyor.coordinator.lifecycle.transitions import PENDING, Cause, Transitions
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import committing
from conveyor.coordinator.store.tasks import NewRow
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.telemetry import dispatch_spans

HAND_OFF_MAX = 16
"""Flushes of at most this many tasks may be handed straight to waiting workers."""


class Dispatcher(Service):
    name = "dispatcher"

    def __init__(self, deps: Deps, policy: DispatchPolicy, leases: Leases | None = None) -> None:
        super().__init__(deps)
        self.policy = policy
        self.leases = leases or Leases(deps)
        """Where assignments that cannot be sent go back."""
        self.dispatched = 0
        self._wake_soon = False
        deps.after_commit.listen(self._on_transitions)

    def _on_transitions(self, batch: Transitions) -> None:
        # Work became ready. One round serves every session, so which queue does not
        # narrow it. The wake waits one turn of the event loop, so the callers whose
        # commit announced the work are answered first: woken at once, the round's claim
        # went out ahead of their answers, and on a small machine sending it can hand the
        # CPU to PostgreSQL for most of a millisecond (a lone submit took 1 ms longer,
        # measured with raw SubmitTask calls).
        if not self._wake_soon and batch.entered(PENDING):
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
        async with self.deps.db.autocommit() as conn:
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
                    metrics.record_flush("claim", len(rows), time.perf_counter() - started)
                    messages = self.policy.pack(rows)
                    if tracing.enabled:
                        dispatch_spans(tracing, rows, messages, started_ns)
                    self.deps.after_commit.publish(Cause.CLAIMED, rows)
                    await self.deliver(conn, session, messages)
        return 0.0 if more else self.deps.config.poll_interval

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
            await self.leases.release_undelivered(conn, undelivered)

    # -- the hand-off of fresh submits ---------------------------------------------------

    def reserve(self, rows: Sequence[NewRow]) -> list[WorkerSession]:
        """A waiting worker for every row, credit reserved; [] unless all rows have one.

        Only small flushes of tasks ready now are handed off: that is the lightly loaded
        case, where pickup latency is what counts; under load the batched claims are
        cheaper.
        """
        if not self.running:
            return []  # not leading (or fenced)
        if len(rows) > HAND_OFF_MAX or any(r.state != PENDING for r in rows):
            return []
        sessions: list[WorkerSession] = []
        live = list(self.deps.sessions)
        for row in rows:
            session = self.policy.pick_idle(live, row.tenant, row.task.queue, row.task.type)
            if session is None:
                self._give_back(sessions)
                return []
            sessions.append(session)
        return sessions

    def _give_back(self, sessions: Sequence[WorkerSession]) -> None:
        for session in sessions:
            session.credit += 1
        if sessions:
            self.wake()

    async def hand_off(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[NewRow],
        sessions: Sequence[WorkerSession],
        now: datetime,
        now_message: Timestamp,
    ) -> list[LeaseKey]:
        """Inserts the rows leased to the sessions :meth:`reserve` gave (one each), then
        queues their assignments; returns the leases, in row order."""
        deps = self.deps
        fence = deps.office.fence()
        started_ns = time.time_ns()
        workers = [s.worker_id for s in sessions]
        try:
            with committing():
                leased = await store.insert_leased(
                    conn, rows, workers, fence, deps.config.lease_duration, now
                )
        except BaseException:
            self._give_back(sessions)
            raise
        keys = [
            LeaseKey(row.tenant, str(row.id), store.FIRST_ATTEMPT, fence.epoch, worker)
            for row, worker in zip(rows, workers, strict=True)
        ]
        messages = [
            Packed(
                dispatch_policy.assignments_message(
                    convert.add_assignment_from_new, [(key, row.task, now_message)]
                ),
                dispatch_policy.assignment_size(row.task.payload, None),
                1,
            )
            for row, key in zip(rows, keys, strict=True)
        ]
        if deps.tracing.enabled:
            dispatch_spans(deps.tracing, leased, messages, started_ns)
        deps.after_commit.publish(Cause.HANDED_OFF, leased)
        for session, packed in zip(sessions, messages, strict=True):
            await self.deliver(conn, session, [packed])
        return keys
