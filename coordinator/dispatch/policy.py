"""The dispatch policy: which worker gets which work, in what order, in what portions.

Everything about the order of work is decided here, in one place that later rules
(fairness between tenants, rate limits, concurrency keys, circuit breakers, deadlines)
extend without touching the stream code:

- :func:`takes`: whether a session takes a (tenant, queue, type) at all. The one matching
  rule, shared with ``unserved``, ``QueueStats.workers`` and the submit hand-off: the
  tenant is the session's, the queue one it names, the type one it has a handler for
  (a worker always names its types; none means nothing, never "anything"). An encrypted
  task also needs a session that holds its key (``WorkerSession.opens``; the claim
  filters on ``tasks.encryption_key`` the same way), so a worker without it neither
  fails the task nor spends its attempts.
- :meth:`DispatchPolicy.plan`: the sessions to claim for in a round, in a rotating order
  so no worker is starved, and how much each may get: its credit, at most
  ``MAX_CLAIM_PER_SESSION`` tasks and ``MAX_CLAIM_BYTES`` of payload, and no more than its
  outbox has room for; with workers of several tenants, turns by tenant of
  ``FAIR_QUANTUM`` times the tenant's dispatch weight (:attr:`DispatchPolicy.weight`).
- :meth:`DispatchPolicy.claim`: one session's claim (``store.tasks.claim``: per queue the
  head of the ready index in dispatch order, priority then age since ids are
  time-ordered, then the best of those heads, cut at the byte budget; leased in the same
  statement, fenced). Where a rate limit covers the session (``rate_limits.py``), the
  claim takes no more than the buckets' tokens (``store.tasks.claim_limited``) and spends
  them; tasks with concurrency keys go by turns of their keys (``concurrency.py``); with
  aging, every claim orders by effective priority. The rules in order are in
  ``docs/architecture.md`` ("The dispatch rules").
- :meth:`DispatchPolicy.pack`: claimed rows as Assignments messages, each at most
  ``MESSAGE_BYTES`` (a single larger task travels alone; configuration guarantees it fits
  the message limit).
- :meth:`DispatchPolicy.pick_idle`: the session a fresh submit may be handed to directly.
- :attr:`DispatchPolicy.pauses`: paused queues (``pauses.py``) are left out of every
  claim and every hand-off.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from conveyor.coordinator import convert
from conveyor.coordinator.dispatch.breakers import Breakers, Settings
from conveyor.coordinator.dispatch.concurrency import ConcurrencyKeys
from conveyor.coordinator.dispatch.pauses import QueuePauses
from conveyor.coordinator.dispatch.rate_limits import Caps, RateLimits
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Fence
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.dispatch.sessions import WorkerSession

T = TypeVar("T")

MAX_CLAIM_PER_SESSION = 500
"""Tasks claimed for one session per round, so one greedy worker cannot stall a round's
transaction; the next round follows at once."""
FAIR_QUANTUM = 100
"""Tasks one claim takes while workers of several tenants wait in a round, times the
tenant's dispatch weight (1 unless set, ``conveyor tenants set --dispatch-weight``): a
tenant whose backlog keeps its workers claiming takes portions of this size, so another
tenant's claim comes at most one portion later (the sessions are interleaved by
tenant)."""
MAX_CLAIM_BYTES = 16 << 20
"""Payload bytes claimed for one session per round (at least one task whatever its size)."""
MESSAGE_BYTES = 3 << 20
"""Target size of one Assignments message: below gRPC's default 4 MiB receive limit."""
ASSIGNMENT_OVERHEAD = 512
"""Bytes an Assignment takes besides its payload and labels (an estimate, on the high side)."""


def takes_from(session: WorkerSession, tenant: str, queue: str) -> bool:
    """Whether ``session`` takes tasks from this tenant's queue (of some type)."""
    return session.tenant == tenant and queue in session.queues


def takes(session: WorkerSession, tenant: str, queue: str, task_type: str) -> bool:
    """Whether ``session`` takes tasks of this tenant, queue and type (the one rule)."""
    return takes_from(session, tenant, queue) and task_type in session.type_set


def unserved(
    sessions: Iterable[WorkerSession],
    tenant: str,
    queue: str,
    task_type: str,
    encryption_key: str | None,
) -> tuple[bool, str]:
    """Whether no session takes this task, and if sessions take its kind but none holds
    its encryption key, that key id ("" otherwise)."""
    takers = [s for s in sessions if not s.closed and takes(s, tenant, queue, task_type)]
    if not takers:
        return True, ""
    if any(s.opens(encryption_key) for s in takers):
        return False, ""
    return True, encryption_key or ""


@dataclass(frozen=True, slots=True)
class Claim:
    """One session's portion of a round."""

    session: WorkerSession
    limit: int
    max_bytes: int


@dataclass(slots=True)
class _Budget:
    """What is left of a claim's portion while its statements run, and what they took.

    The bytes taken are summed only when a further statement needs them: the plain claim
    alone never walks its rows here."""

    limit: int
    bytes_given: int
    rows: list[asyncpg.Record] = field(default_factory=list)
    _bytes_left: int | None = None

    @property
    def max_bytes(self) -> int:
        if self._bytes_left is None:
            self._bytes_left = self.bytes_given - sum(len(r["payload"]) for r in self.rows)
        return self._bytes_left

    def left(self) -> bool:
        return self.limit > 0 and self.max_bytes > 0

    def take(self, rows: list[asyncpg.Record]) -> None:
        if rows:
            self.limit -= len(rows)
            self.rows = self.rows + rows if self.rows else rows
            self._bytes_left = None


@dataclass(frozen=True, slots=True)
class Packed:
    """One Assignments message, with its weight against the session's outbox."""

    message: worker_service_pb2.ConnectResponse
    size: int
    count: int


class DispatchPolicy:
    """See the module docstring."""

    def __init__(
        self,
        *,
        lease_seconds: float,
        max_payload_bytes: int,
        limits: RateLimits | None = None,
        breakers: Breakers | None = None,
        aging: tuple[float, int] | None = None,
        weight: Callable[[str], int] | None = None,
    ) -> None:
        self._lease_seconds = lease_seconds
        self._max_payload_bytes = max_payload_bytes
        self._rotation = itertools.count()
        self.pauses = QueuePauses()
        """Paused queues: no claim or hand-off takes from them."""
        self.limits = limits or RateLimits()
        """The rate limits' token buckets (the leader's)."""
        self.keys = ConcurrencyKeys()
        """Which tenants have tasks with concurrency keys ready."""
        self.breakers = breakers or Breakers(Settings(0.0, 1, 60.0, 30.0, 1))
        """The circuit breakers per (tenant, type) (off unless configured)."""
        self.aging = aging
        """(seconds per step, most steps) of aging, or None: priority alone."""
        self.weight: Callable[[str], int] = weight or _equal
        """A tenant's dispatch weight (``Limits.dispatch_weight``; 1 when not set)."""

    def reset(self) -> None:
        """A new term: the flow-control state is read again before the first claim."""
        self.limits.reset()
        self.keys.reset()
        self.breakers.reset()

    def stale(self) -> bool:
        """Whether the flow-control state is due to be read again (about once a second)."""
        return self.limits.stale()

    async def refresh(self, conn: asyncpg.Connection) -> None:
        await self.limits.refresh(conn)
        await self.keys.refresh(conn)
        await self.breakers.refresh(conn)

    def plan(self, sessions: Iterable[WorkerSession]) -> list[Claim]:
        """This round's claims, in a rotating order so no worker is starved; with workers
        of several tenants, interleaved by tenant in portions of FAIR_QUANTUM times the
        tenant's dispatch weight (at most MAX_CLAIM_PER_SESSION)."""
        return list(self.plan_lazily(sessions))

    def plan_lazily(
        self,
        sessions: Iterable[WorkerSession],
        skip: Callable[[WorkerSession], bool] | None = None,
    ) -> Iterator[Claim]:
        """:meth:`plan`, made as the round goes: a session ``skip`` says has nothing to
        claim (its kind was found drained earlier in the round) gets no claim, and one
        after the round stopped is not looked at. A round over 10,000 idle sessions built
        10,000 claims to skip all but one per kind (issue 19)."""
        ready = [s for s in sessions if s.wants_work]
        portions: dict[str, int] | None = None
        if len(ready) > 1:
            shift = next(self._rotation) % len(ready)
            ready = ready[shift:] + ready[:shift]
            interleaved = by_tenant(ready)
            if interleaved is not None:
                ready = interleaved
                weight = self.weight
                portions = {
                    t: min(MAX_CLAIM_PER_SESSION, FAIR_QUANTUM * max(1, weight(t)))
                    for t in {s.tenant for s in ready}
                }
        for session in ready:
            if skip is not None and skip(session):
                continue
            room = min(MAX_CLAIM_BYTES, session.outbox_room)
            session.throttled = room <= 0
            if room > 0 and session.wants_work:  # (credit a hand-off took since)
                most = MAX_CLAIM_PER_SESSION if portions is None else portions[session.tenant]
                yield Claim(session, min(session.credit, most), room)

    async def claim(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        fence: Fence,
        *,
        plain: asyncpg.Connection | None = None,
    ) -> list[asyncpg.Record]:
        """Leases up to the claim's portion of ready tasks to its session (fenced): the
        claim query of ``store/tasks.py``, in the order it decides. ``plain``: the
        connection for the plain claim without aging (``Database.claims``, its plan made
        once); None: ``conn``, like every other statement."""
        if plain is None or self.aging is not None:
            plain = conn
        session = claim.session
        tenant = session.tenant
        # Paused queues are left out (pauses.py).
        queues = self.pauses.open_queues(tenant, session.queues)
        if not queues:
            return []
        # Open circuit breakers take their types out (the same tuple when none is open).
        types = self.breakers.allowed(tenant, session.task_types)
        budget = _Budget(claim.limit, claim.max_bytes)
        if types and tenant in self.keys.tenants:
            caps = self.limits.caps(tenant, queues, types, budget.limit)
            budget.take(
                await self._claim_pairs(conn, session, queues, types, budget, fence, caps, True)
            )
        if types and budget.left():
            caps = self.limits.caps(tenant, queues, types, budget.limit)
            if caps is None:
                budget.take(await self._claim_plain(plain, session, queues, types, budget, fence))
            else:
                budget.take(
                    await self._claim_pairs(
                        conn, session, queues, types, budget, fence, caps, False
                    )
                )
        if self.breakers.enabled and budget.left():
            # Half-open breakers: their probes, a claim of the type alone.
            for type_, probes in self.breakers.probing(tenant, session.task_types):
                if not budget.left():
                    break
                probe = _Budget(min(probes, budget.limit), budget.max_bytes)
                rows = await self._claim_plain(plain, session, queues, (type_,), probe, fence)
                self.breakers.sent_probes(tenant, type_, len(rows))
                budget.take(rows)
        return budget.rows

    async def _claim_pairs(
        self,
        conn: asyncpg.Connection,
        session: WorkerSession,
        queues: Sequence[str],
        types: Sequence[str],
        budget: _Budget,
        fence: Fence,
        caps: Caps | None,
        keyed: bool,
    ) -> list[asyncpg.Record]:
        """The claim per (queue, type) pair: under the rate limits' ``caps`` when some
        cover the session, of the tasks with concurrency keys (``keyed``) or without."""
        limit = budget.limit
        pairs = [(q, t, limit) for q in queues for t in types] if caps is None else caps.pairs
        tenant = session.tenant
        after = self.keys.after(tenant, pairs) if keyed else ()
        rows = (
            await store.claim_limited(
                conn,
                tenant=tenant,
                pairs=pairs,
                queue_caps=caps.queues if caps else (),
                type_caps=caps.types if caps else (),
                total=caps.total if caps else limit,
                keyed=keyed,
                keys=session.encryption_keys,
                limit=limit,
                max_bytes=budget.max_bytes,
                worker_id=session.worker_id,
                holder=session.holder,
                lease_seconds=self._lease_seconds,
                fence=fence,
                aging=self.aging,
                after=after,
            )
            if pairs
            else []
        )
        if keyed and rows:
            self.keys.served(tenant, rows)
        if caps is not None:
            self.limits.spend(caps, rows)
        return rows

    async def _claim_plain(
        self,
        conn: asyncpg.Connection,
        session: WorkerSession,
        queues: Sequence[str],
        types: Sequence[str],
        budget: _Budget,
        fence: Fence,
    ) -> list[asyncpg.Record]:
        return await store.claim(
            conn,
            tenant=session.tenant,
            queues=queues,
            types=types,
            keys=session.encryption_keys,
            limit=budget.limit,
            max_bytes=budget.max_bytes,
            worker_id=session.worker_id,
            holder=session.holder,
            lease_seconds=self._lease_seconds,
            fence=fence,
            aging=self.aging,
        )

    def filled(self, claim: Claim, rows: Sequence[asyncpg.Record]) -> bool:
        """Whether the claim got its whole portion (so more work may be waiting)."""
        if not rows or len(rows) >= claim.limit:
            return bool(rows)
        # Cut at the byte budget: the next task may not have fitted.
        claimed = sum(len(r["payload"]) for r in rows)
        return claimed + self._max_payload_bytes > claim.max_bytes

    @staticmethod
    def pack(rows: Sequence[asyncpg.Record]) -> list[Packed]:
        """Claimed rows as Assignments messages of at most MESSAGE_BYTES each (estimated)."""
        weights = [assignment_size(r["payload"], r["labels"]) for r in rows]
        return [
            Packed(convert.assignments_from_rows(rows[i:j]), size, j - i)
            for i, j, size in split(weights)
        ]

    @staticmethod
    def unusable(rows: Sequence[asyncpg.Record]) -> dict[int, Exception]:
        """The claimed rows no Assignment can carry (a value written by hand, past
        validation, that does not convert), by position, with why: when :meth:`pack`
        fails, the rows are tried one by one to find them."""
        found: dict[int, Exception] = {}
        for i, row in enumerate(rows):
            try:
                convert.assignments_from_rows([row])
            except Exception as exc:
                found[i] = exc
        return found

    def may_hand_off(self, rows: Iterable[store.NewRow]) -> bool:
        """Whether fresh submits may go straight to waiting workers: not to a paused queue
        (nor before this term has read which are), nor past a flow-control rule."""
        pauses, limits, breakers = self.pauses, self.limits, self.breakers
        return all(
            pauses.may_hand_off(r.tenant, r.task.queue)
            # A keyed task, one a rate limit covers (or before the limits are read), or
            # one whose breaker is not closed: the claim decides.
            and not r.task.concurrency_key
            and not limits.covering(r.tenant, r.task.queue, r.task.type)
            and not breakers.blocks(r.tenant, r.task.type)
            for r in rows
        )

    @staticmethod
    def pick_idle(
        sessions: Iterable[WorkerSession],
        tenant: str,
        queue: str,
        task_type: str,
        encryption_key: str | None = None,
    ) -> WorkerSession | None:
        """A starving session that takes this kind of task, with one credit reserved.

        For the submit hand-off; the caller gives the credit back if the task does not
        reach the session after all.
        """
        for session in sessions:
            if (
                session.starving
                and session.wants_work
                and session.outbox_room > 0
                and takes(session, tenant, queue, task_type)
                and session.opens(encryption_key)
            ):
                session.credit -= 1
                return session
        return None


def _equal(tenant: str) -> int:
    return 1


def by_tenant(sessions: Sequence[WorkerSession]) -> list[WorkerSession] | None:
    """The sessions taking turns by tenant (the first of each tenant, then the second,
    ...), keeping each tenant's order; None when they are all one tenant's."""
    if not sessions:
        return None
    first = sessions[0].tenant
    if all(s.tenant == first for s in sessions):
        return None
    groups: dict[str, list[WorkerSession]] = {}
    for session in sessions:
        groups.setdefault(session.tenant, []).append(session)
    if len(groups) < 2:
        return None
    turns = itertools.zip_longest(*groups.values())
    return [s for turn in turns for s in turn if s is not None]


def assignment_size(payload: bytes, labels: object) -> int:
    """The estimated encoded size of an Assignment (``labels`` as stored: JSON text)."""
    return len(payload) + ASSIGNMENT_OVERHEAD + (len(labels) if isinstance(labels, str) else 0)


def split(weights: Sequence[int]) -> list[tuple[int, int, int]]:
    """Consecutive groups of at most MESSAGE_BYTES (a heavier item alone): (start, end, size)."""
    groups: list[tuple[int, int, int]] = []
    start, size = 0, 0
    for index, weight in enumerate(weights):
        if index > start and size + weight > MESSAGE_BYTES:
            groups.append((start, index, size))
            start, size = index, 0
        size += weight
    if len(weights) > start:
        groups.append((start, len(weights), size))
    return groups


def assignments_message(
    add_one: Callable[[Any, T], object], items: Sequence[T]
) -> worker_service_pb2.ConnectResponse:
    """An Assignments message built in place (a message made apart would be copied in)."""
    message = worker_service_pb2.ConnectResponse()
    add = message.assignments.assignments.add
    for item in items:
        add_one(add, item)
    return message
