"""Leases, coordinator side: where every lease begins, is renewed and ends.

A lease names one attempt of a task held by one worker. Its key (:class:`LeaseKey`) is
``(tenant, task id, attempt, epoch, worker id)``: the task id, attempt and epoch come from
the wire (``conveyor.v1.Lease``), the tenant and worker id from the session that sends it,
so a worker can only ever name its own leases. ``epoch`` is the leader's epoch that
granted the lease (the fencing token; the ``lease_epoch`` column). Results, renewals,
cancels and releases match by the whole key (``store/tasks.py``), and the store says
which entries it matched: a stale result flushed beside the current attempt's result is
refused and recorded, never taken for it.

A lease begins here, in the :class:`Dispatcher` (a leader service, ``supervisor.py``):

- a round follows the dispatch policy (``dispatch/policy.py``): for each session in its
  plan, one fenced claim statement, then the claimed tasks go into that session's outbox
  at once, before the next claim. So a claim that fails loses nothing claimed before it,
  and the failing session's reserved credit is given back; pushing never waits for a
  worker. The dispatcher wakes when work became ready (an after-commit listener: a
  submit, promotion or release committed), when a worker grants credit, and on a slow
  timer as a safety net;
- the hand-off (:meth:`Dispatcher.reserve`, :meth:`Dispatcher.hand_off`): a small submit
  of tasks ready now, with a starving worker for each, is inserted already leased to
  them in the statement that commits it, and queued to them at once.

While it is held, :class:`Leases` renews it (every heartbeat renews the leases it lists,
group-committed) and takes it back when its worker cannot finish it: on a reconnect,
the leases the worker does not list in ``Hello.in_flight`` (never received: not
counted); leases queued for a stream that ended before they were written
(:data:`UNDELIVERED`, not counted); an evicted worker's (counted: they may have run). A
lease ends as a transition (``transitions.py``): a result (``results.py``), one of the
releases here, or an expiry (the reaper, ``leader/maintenance.py``).

Postgres is the queue: nothing about dispatch lives only in memory, so a new leader
rebuilds nothing but its session list. Task ids stay canonical lowercase text end to
end (asyncpg encodes text to uuid): parsing a UUID object per result is measurable at
10,000 results a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.coordinator import convert
from conveyor.coordinator.dispatch import policy as dispatch_policy
from conveyor.coordinator.dispatch.policy import Claim, DispatchPolicy, Packed
from conveyor.coordinator.leader.maintenance import set_aside
from conveyor.coordinator.lifecycle.batcher import Batcher, group_commit
from conveyor.coordinator.lifecycle.transitions import PENDING, Cause, Transitions, split_released
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import committing
from conveyor.coordinator.store.tasks import NewRow, Release
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.telemetry import dispatch_spans
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.api.validation import ValidHello
    from conveyor.coordinator.deps import Deps
    from conveyor.coordinator.dispatch.sessions import WorkerSession

_log = logging.getLogger("conveyor.coordinator.leases")

# Why a lease was refused, as a worker reads it in ResultAck.reason.
REFUSED_NOT_CURRENT = "lease is not current: the task finished, was cancelled or was leased again"
REFUSED_MALFORMED = "malformed task id"
REFUSED_UNKNOWN_OUTCOME = "unknown outcome"

_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

UNDELIVERED = Release(
    store.OUTCOME_NOT_STARTED,
    False,
    "never started: the stream to worker %s ended before the task was sent",
)


class LeaseKey(NamedTuple):
    """One attempt of one task, held by one worker: the key everything matches by."""

    tenant: str
    task_id: str
    """Canonical lowercase text."""
    attempt: int
    epoch: int
    worker_id: str


def lease_holder(resume_token: bytes) -> bytes:
    """What a lease records of the token of the process it was granted to (its SHA-256:
    the ``lease_holder`` column, ``sessions.WorkerSession.holder``)."""
    return hashlib.sha256(resume_token).digest()


def parse(tenant: str, worker_id: str, lease: worker_service_pb2.Lease) -> LeaseKey | None:
    """The key a worker's lease names; None when the task id is malformed."""
    task_id = lease.task_id.lower()
    if not _TASK_ID.fullmatch(task_id):
        return None
    return LeaseKey(tenant, task_id, lease.attempt, lease.epoch, worker_id)


@dataclass
class Mapped:
    """One Results or Heartbeat message, checked: what goes to the store and what not.

    ``stored`` holds the positions (in the message) of the entries sent to the store,
    whose answers come back in that order; ``refused`` the others, with the reason.
    """

    size: int
    stored: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    missing_keys: set[str] | None = None
    """Encryption key ids the worker reported it does not hold (KEY_UNAVAILABLE)."""

    def answers(self, stored_answers: Sequence[bool]) -> list[tuple[bool, str]]:
        """(accepted, reason) for every entry of the message, in order."""
        out: list[tuple[bool, str]] = [(False, "")] * self.size
        for index, reason in self.refused.items():
            out[index] = (False, reason)
        for index, ok in zip(self.stored, stored_answers, strict=True):
            out[index] = (ok, "" if ok else REFUSED_NOT_CURRENT)
        return out


def map_leases(
    tenant: str, worker_id: str, wire: Sequence[worker_service_pb2.Lease]
) -> tuple[Mapped, list[LeaseKey]]:
    """Checks one Heartbeat's leases; returns the mapping and the keys to renew."""
    mapped = Mapped(len(wire))
    keys: list[LeaseKey] = []
    for index, lease in enumerate(wire):
        key = parse(tenant, worker_id, lease)
        if key is None:
            mapped.refused[index] = REFUSED_MALFORMED
        else:
            mapped.stored.append(index)
            keys.append(key)
    return mapped, keys


ARRIVALS_PER_FLUSH = 1000
"""First Hellos whose foreign leases one statement takes back at most."""
ARRIVALS_SPACING = 0.05
"""Seconds between two flushes of first Hellos, at least. A fleet connecting at once
shares a transaction per 50 ms instead of one per few Hellos (issue 19: 10,000 workers
connecting made 1,250 transactions of 8 Hellos each, 1.7 s of PostgreSQL's CPU on the
two cores the coordinator and the workers shared); a Hello after a quiet spell is
flushed at once, and one in a storm waits 50 ms at most for its turn."""


class Leases:
    """Renewals and the releases of leases held (see the module docstring).

    The renewal batcher runs with the process, not the term: a follower's renewals are
    refused by the fence like any dispatch-side write.
    """

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        # One item per heartbeat (a list of leases), so a message costs one future.
        self.renewals: Batcher[Sequence[LeaseKey], list[bool]] = group_commit(
            "renewal", self._flush_renewals, deps
        )
        # One item per first Hello of a worker process: (tenant, worker id, the new
        # session's holder); the leases of the worker id that it takes back. One array
        # statement per flush: with a statement per Hello, a flush of 100 took 100 turns
        # of an event loop busy with 10,000 connecting streams, sat idle in its
        # transaction past PostgreSQL's 5 s, was cut, and every Hello in it failed
        # (issue 19, third round: 0 of 3,000 streams connected on a loaded VM).
        self.arrivals: Batcher[tuple[str, str, bytes], list[asyncpg.Record]] = Batcher(
            "arrival",
            self._flush_arrivals,
            max_batch=ARRIVALS_PER_FLUSH,
            max_pending=deps.config.max_pending_operations,
            on_flush=deps.metrics.record_flush,
            spacing=ARRIVALS_SPACING,
        )

    def start(self) -> None:
        self.renewals.start()
        self.arrivals.start()

    async def stop(self) -> None:
        await self.renewals.stop()
        await self.arrivals.stop()

    async def _flush_renewals(self, messages: Sequence[Sequence[LeaseKey]]) -> list[list[bool]]:
        deps = self._deps
        keys = [k for message in messages for k in message]
        async with deps.db.autocommit() as conn:
            renewed = await store.renew_leases(
                conn, keys, deps.config.lease_duration, deps.office.fence()
            )
        deps.metrics.record_refused(len(keys) - len(renewed))
        answers = iter(i in renewed for i in range(len(keys)))
        return [[next(answers) for _ in message] for message in messages]

    async def _flush_arrivals(
        self, arrivals: Sequence[tuple[str, str, bytes]]
    ) -> list[list[asyncpg.Record]]:
        deps = self._deps
        fence = deps.office.fence()
        async with deps.db.write(fence) as conn:
            rows = await store.release_foreign_many(conn, arrivals, fence)
        taken: dict[tuple[str, str], list[asyncpg.Record]] = {}
        for row in rows:
            taken.setdefault((row["tenant"], row["worker_id"]), []).append(row)
        return [taken.get((tenant, worker_id), []) for tenant, worker_id, _ in arrivals]

    async def resume(
        self, session: WorkerSession, hello: ValidHello, *, proven: bool
    ) -> list[worker_service_pb2.Lease]:
        """A worker (re)connects: returns the leases it lists that it lost.

        Its process's own leases (granted to the resume token it presents; ``proven``: the
        token is the live session's it replaced): those it lists and that are still
        current are renewed, every other goes back at once, not counted (it lists all it
        holds, so it never received those). Any other lease of its worker id was granted
        to another process, which may be running it: it goes back counted (LEASE_EXPIRED),
        even if listed.
        """
        tenant, worker_id, token = session.tenant, session.worker_id, hello.resume_token
        keys: list[LeaseKey] = []
        lost: list[worker_service_pb2.Lease] = []
        for lease in hello.in_flight:
            key = parse(tenant, worker_id, lease)
            if key is None:
                lost.append(lease)
            else:
                keys.append(key)
        deps = self._deps
        renewed: set[int]
        unsent: list[asyncpg.Record]
        if not token and not hello.in_flight:
            # A process's first Hello (10,000 of them when a fleet starts): its session's
            # holder is new, so no lease can be its own, and only the worker id's leases
            # held elsewhere go back. Many such Hellos share one fenced transaction of one
            # statement, instead of a transaction of five round trips each.
            renewed, unsent = set(), []
            foreign = await self.arrivals.submit((tenant, worker_id, session.holder))
        else:
            renewed, unsent, foreign = await self._resume(session, token, keys, proven=proven)
        lost.extend(convert.to_proto(k) for i, k in enumerate(keys) if i not in renewed)
        if unsent:
            _log.info("took back %d tasks worker %s never received", len(unsent), worker_id)
            deps.after_commit.publish(Cause.NOT_STARTED, unsent)
        if foreign:
            _log.warning(
                "worker id %s connected from a process without the resume token of the one "
                "that held %d running tasks: took them back as expired leases (they may have "
                "run); a worker process sends its token when it reconnects",
                worker_id,
                len(foreign),
            )
            deps.after_commit.publish(Cause.TAKEN_OVER, foreign)
        return lost

    async def _resume(
        self, session: WorkerSession, token: bytes, keys: list[LeaseKey], *, proven: bool
    ) -> tuple[set[int], list[asyncpg.Record], list[asyncpg.Record]]:
        """Resumes the leases of the process ``token`` names (see :meth:`resume`): the
        positions of ``keys`` renewed, the leases it never received, those of others."""
        deps = self._deps
        tenant, worker_id = session.tenant, session.worker_id
        fence = deps.office.fence()
        async with deps.db.write(fence) as conn:
            if token and (
                proven or await store.holds_leases(conn, tenant, worker_id, lease_holder(token))
            ):
                session.adopt(token)
            holder = session.holder
            renewed = (
                await store.resume_leases(conn, keys, holder, deps.config.lease_duration, fence)
                if keys
                else set()
            )
            kept = [k for i, k in enumerate(keys) if i in renewed]
            unsent = await store.release_abandoned(conn, tenant, worker_id, holder, kept, fence)
            foreign = await store.release_foreign(conn, tenant, worker_id, holder, fence)
        return renewed, unsent, foreign

    async def release_undelivered(self, conn: asyncpg.Connection, keys: list[LeaseKey]) -> None:
        """Puts leases that never reached their worker back to PENDING, not counted."""
        deps = self._deps
        released = await store.release_leases(conn, keys, UNDELIVERED, deps.office.fence())
        if released:
            _log.info("took back %d tasks that never reached their worker", len(released))
            deps.after_commit.publish(Cause.NOT_STARTED, released)

    async def release_evicted(self, conn: asyncpg.Connection, session: WorkerSession) -> int:
        """Takes back every lease of an evicted session, counted (they may have run);
        returns how many (none when a newer session of its process took them over)."""
        deps = self._deps
        async with session.releasing:
            if session.superseded:
                return 0
            reason = session.end_reason.replace("%", "%%")
            how = Release(store.OUTCOME_LEASE_EXPIRED, True, f"worker %s was evicted: {reason}")
            released = await store.release_worker(
                conn, session.tenant, session.worker_id, session.holder, how, deps.office.fence()
            )
        deps.after_commit.publish(Cause.EVICTED, released)
        return len(split_released(Cause.EVICTED, released)[0])


# -- where leases begin -----------------------------------------------------------------


def _until_drained(claims: Iterable[Claim], drained: set[object]) -> Iterator[Claim]:
    """The round's claims, less those of a kind of session (``WorkerSession.kind``) whose
    claim found less than it asked for earlier in the round (its ``starving``, set by the
    round): nothing is left for that kind, so its other sessions are starving too, and are
    not claimed for. Work ready after that claim wakes the next round. ``drained`` is
    filled with those kinds.

    Without this a round ran one claim per idle session: with 4,000 idle workers a round
    took seconds, and pickup p99 was 2.5 s (issue 19).
    """
    for claim in claims:
        session = claim.session
        kind = session.kind
        if kind in drained:
            session.starving = True
            continue
        yield claim
        if session.starving:
            drained.add(kind)


def _drained_skipper(drained: set[object]) -> Callable[[WorkerSession], bool]:
    """Whether a round makes no claim for a session: its kind found nothing earlier in
    the round (``drained``, filled by :func:`_until_drained`); it is starving then."""

    def skip(session: WorkerSession) -> bool:
        if session.kind in drained:
            session.starving = True
            return True
        return False

    return skip


SAMPLED_KIND_SESSIONS = 64
"""A kind of session with this many sessions or more, found drained by the last round
with no wake since, is looked at through one of its sessions in the next round (the
poll's), not all: a round over 10,000 idle sessions of one kind took 10-20 ms of the
event loop every second to skip all but one (issue 19), and every pickup meanwhile
waited. The one sampled rotates, so a session that cannot take work now is not picked
each time. Smaller kinds are looked at whole, as before."""


HAND_OFF_MAX = 64
"""Flushes of at most this many tasks may be handed straight to waiting workers.

Not only the lone submit: when a commit stalls (a slow fsync, a descheduled process),
the lone submits arriving meanwhile queue up and flush together once it ends. Above 16
such a flush went the batched way, a commit for the insert and one more for the claim,
so the submits that had waited longest waited for a second commit too (issue 19: 3-9 %
of the probes at 100/s on a loaded VM, the slowest ones). Handed off, they are leased in
the insert's own commit, and each worker's share goes out as one message."""


class Dispatcher(Service):
    name = "dispatcher"

    def __init__(self, deps: Deps, policy: DispatchPolicy, leases: Leases) -> None:
        super().__init__(deps)
        self.policy = policy
        self.leases = leases
        """Where assignments that cannot be sent go back (the process's one Leases)."""
        self.dispatched = 0
        self._wake_soon = False
        # Every wake is a new generation. The kinds of session the last round found
        # nothing more for, and the generation it started in: while no wake came since,
        # nothing became ready for them (see offer).
        self._generation = 0
        self._drained: set[object] = set()
        self._drained_at = -1
        # The same of the round before, for offers made while a round runs: until its
        # claim for a kind comes back, the kind is not in ``_drained`` yet.
        self._before: set[object] = set()
        self._before_at = -1
        self._samples = 0
        deps.after_commit.listen(self._on_transitions)
        # A concurrency slot frees on every transition out of RUNNING (the seam).
        policy.keys.wake = self.wake
        deps.after_commit.listen(policy.keys.on_transitions)
        # The circuit breakers count every attempt that ended (the seam too).
        policy.breakers.wake = self.wake
        deps.after_commit.listen(policy.breakers.on_transitions)

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

    def wake(self) -> None:
        """Runs a round now (or right after the current one): something may be ready."""
        self._generation += 1
        super().wake()

    def offer(self, session: WorkerSession) -> None:
        """A session can take more (it connected, or granted credit): a round, unless the
        last one found nothing left for its kind and nothing woke the dispatcher since
        (every way work becomes ready wakes it). Then the session is starving, so a fresh
        submit is handed to it directly.

        With thousands of workers a round per credit cost more than the tasks: each
        result's credit ran a round over every session (42 % of the coordinator's CPU at
        3,000 streams and 50 tasks/s).
        """
        kind, generation = session.kind, self._generation
        if (self._drained_at == generation and kind in self._drained) or (
            # A round is running (a credit arrived during its claim): the round before
            # found the kind drained, and nothing woke the dispatcher since either. Else
            # each poll's round, taking one claim's time, met a credit now and then at
            # 50 tasks/s, and that woke a round over every session (issue 19).
            self._before_at == generation and kind in self._before
        ):
            session.starving = True
            return
        self.wake()

    def start(self) -> None:
        if not self.running:
            # A new term: the rate limits' buckets start empty (dispatch/rate_limits.py).
            self.policy.reset()
        super().start()

    async def stop(self) -> None:
        await super().stop()
        self.policy.pauses.forget()  # the next term reads them again

    async def step(self) -> float:
        if not self.policy.pauses.current:
            await self.policy.pauses.load(self.deps.db)
        drained: set[object] = set()
        claims = self.policy.plan_lazily(self._round_sessions(), _drained_skipper(drained))
        first = next(claims, None)
        if first is None:
            return self.deps.config.poll_interval
        fence = self.deps.office.fence()
        metrics, tracing = self.deps.metrics, self.deps.tracing
        more = False
        limits = self.policy.limits
        stopped: asyncio.CancelledError | None = None
        self._before, self._before_at = self._drained, self._drained_at
        self._drained, self._drained_at = drained, self._generation
        async with self.deps.db.autocommit() as conn, self.deps.db.claims() as claim_conn:
            if self.policy.stale():
                await self.policy.refresh(conn)
            for claim in _until_drained(itertools.chain((first,), claims), drained):
                session = claim.session
                # Reserved before the claim: a submit hand-off may take credit meanwhile.
                session.credit -= claim.limit
                started, started_ns = time.perf_counter(), time.time_ns()
                # A stop (a term ending, a shutdown) that lands while the claim runs must
                # not lose what it leased (it commits on its own): those tasks would wait
                # out their lease undelivered. The claim finishes, its rows go out as
                # usual, and then the step ends.
                claiming = asyncio.ensure_future(
                    self.policy.claim(conn, claim, fence, plain=claim_conn)
                )
                try:
                    try:
                        rows = await asyncio.shield(claiming)
                    except asyncio.CancelledError as exc:
                        stopped = exc
                        rows = await claiming
                except BaseException:
                    session.credit += claim.limit
                    if stopped is not None:
                        raise stopped from None
                    raise
                session.credit += claim.limit - len(rows)
                full = self.policy.filled(claim, rows)
                # Nothing more waiting for it: a fresh submit may be handed to it directly.
                session.starving = not full
                if rows:
                    more = more or full
                    metrics.record_flush("claim", len(rows), time.perf_counter() - started)
                    self.deps.after_commit.publish(Cause.CLAIMED, rows)
                    try:
                        messages = self.policy.pack(rows)
                    except Exception:
                        rows = await self._set_aside_unusable(conn, session, rows)
                        messages = self.policy.pack(rows)
                    if tracing.enabled:
                        dispatch_spans(tracing, rows, messages, started_ns)
                    await self.deliver(conn, session, messages)
                if stopped is not None:
                    raise stopped
        if limits.holds:
            metrics.count_holds(limits.holds, "rate_limit")
            limits.holds.clear()
        refill = limits.wake_after()
        if more:
            return 0.0
        poll = self.deps.config.poll_interval
        return poll if refill is None else min(poll, refill)

    def _round_sessions(self) -> Iterable[WorkerSession]:
        """The sessions a round looks at: every one, but when nothing woke the dispatcher
        since the last round found kinds of session drained (a round of the slow poll,
        the safety net), only one of each such kind, taking turns (see
        :data:`SAMPLED_KIND_SESSIONS`). A claim for it that fills up means work became
        ready without a wake: the round then ends with more to do, and the next one
        (right after) looks at every session of the kind again, since that kind is no
        longer drained."""
        registry = self.deps.sessions
        drained = self._drained
        if self._drained_at != self._generation or not drained:
            return registry
        kinds = registry.by_kind()
        if not any(len(kinds.get(kind, ())) >= SAMPLED_KIND_SESSIONS for kind in drained):
            return registry
        self._samples += 1
        chosen: list[WorkerSession] = []
        for kind, group in kinds.items():
            if kind not in drained or len(group) < SAMPLED_KIND_SESSIONS:
                chosen.extend(group)
                continue
            count = len(group)
            start = self._samples % count
            for i in range(count):
                session = group[(start + i) % count]
                if session.wants_work:
                    chosen.append(session)
                    break
        return chosen

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
            await self.leases.release_undelivered(conn, undelivered)

    # -- the hand-off of fresh submits ---------------------------------------------------

    def reserve(self, rows: Sequence[NewRow]) -> list[WorkerSession]:
        """A waiting worker for every row, credit reserved; [] unless all rows have one.

        Only small flushes of tasks ready now are handed off: that is the lightly loaded
        case, where pickup latency is what counts; under load the batched claims are
        cheaper.
        """
        if not self.running or not self.deps.office.leader:
            return []  # not leading (or fenced): a follower's submit only inserts
        if len(rows) > HAND_OFF_MAX or any(r.state != PENDING for r in rows):
            return []
        if not self.policy.may_hand_off(rows):
            return []
        sessions: list[WorkerSession] = []
        live = self.deps.sessions.live()  # not copied: nothing below awaits
        for row in rows:
            task = row.task
            session = self.policy.pick_idle(
                live, row.tenant, task.queue, task.type, store.encryption_key(task)
            )
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
        holders = [s.holder for s in sessions]
        try:
            with committing():
                leased = await store.insert_leased(
                    conn, rows, workers, holders, fence, deps.config.lease_duration, now
                )
        except BaseException:
            self._give_back(sessions)
            raise
        keys = [
            LeaseKey(row.tenant, str(row.id), store.FIRST_ATTEMPT, fence.epoch, worker)
            for row, worker in zip(rows, workers, strict=True)
        ]
        # Each session's rows in one message (more than one past MESSAGE_BYTES), in row order.
        shares: dict[WorkerSession, list[int]] = {}
        for index, session in enumerate(sessions):
            shares.setdefault(session, []).append(index)
        deliveries: list[tuple[WorkerSession, list[Packed]]] = []
        for session, indexes in shares.items():
            sizes = [dispatch_policy.assignment_size(rows[i].task.payload, None) for i in indexes]
            packed = [
                Packed(
                    dispatch_policy.assignments_message(
                        convert.add_assignment_from_new,
                        [(keys[i], rows[i].task, now_message) for i in indexes[start:end]],
                    ),
                    size,
                    end - start,
                )
                for start, end, size in dispatch_policy.split(sizes)
            ]
            deliveries.append((session, packed))
        if deps.tracing.enabled:
            messages = [p for _, packed in deliveries for p in packed]
            dispatch_spans(deps.tracing, leased, messages, started_ns)
        deps.after_commit.publish(Cause.HANDED_OFF, leased)
        for session, packed in deliveries:
            await self.deliver(conn, session, packed)
        return keys
