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
  outbox has room for.
- :meth:`DispatchPolicy.claim`: one session's claim (``store.tasks.claim``: per queue the
  head of the ready index in dispatch order, priority then age since ids are
  time-ordered, then the best of those heads, cut at the byte budget; leased in the same
  statement, fenced).
- :meth:`DispatchPolicy.pack`: claimed rows as Assignments messages, each at most
  ``MESSAGE_BYTES`` (a single larger task travels alone; configuration guarantees it fits
  the message limit).
- :meth:`DispatchPolicy.pick_idle`: the session a fresh submit may be handed to directly.
- :attr:`DispatchPolicy.pauses`: paused queues (``pauses.py``) are left out of every
  claim and every hand-off.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from conveyor.coordinator import convert
from conveyor.coordinator.dispatch.pauses import QueuePauses
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Fence
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.dispatch.sessions import WorkerSession

T = TypeVar("T")

MAX_CLAIM_PER_SESSION = 500
"""Tasks claimed for one session per round, so one greedy worker cannot stall a round's
transaction; the next round follows at once."""
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


@dataclass(frozen=True, slots=True)
class Packed:
    """One Assignments message, with its weight against the session's outbox."""

    message: worker_service_pb2.ConnectResponse
    size: int
    count: int


class DispatchPolicy:
    """See the module docstring."""

    def __init__(self, *, lease_seconds: float, max_payload_bytes: int) -> None:
        self._lease_seconds = lease_seconds
        self._max_payload_bytes = max_payload_bytes
        self._rotation = itertools.count()
        self.pauses = QueuePauses()
        """Paused queues: no claim or hand-off takes from them."""

    def plan(self, sessions: Iterable[WorkerSession]) -> list[Claim]:
        """This round's claims, in a rotating order so no worker is starved."""
        ready = [s for s in sessions if s.wants_work]
        if len(ready) > 1:
            shift = next(self._rotation) % len(ready)
            ready = ready[shift:] + ready[:shift]
        claims: list[Claim] = []
        for session in ready:
            room = min(MAX_CLAIM_BYTES, session.outbox_room)
            session.throttled = room <= 0
            if room > 0:
                claims.append(Claim(session, min(session.credit, MAX_CLAIM_PER_SESSION), room))
        return claims

    async def claim(
        self, conn: asyncpg.Connection, claim: Claim, fence: Fence
    ) -> list[asyncpg.Record]:
        """Leases up to the claim's portion of ready tasks to its session (fenced): the
        claim query of ``store/tasks.py``, in the order it decides."""
        session = claim.session
        queues = self.pauses.open_queues(session.tenant, session.queues)
        if not queues:
            return []
        return await store.claim(
            conn,
            tenant=session.tenant,
            queues=queues,
            types=session.task_types,
            keys=session.encryption_keys,
            limit=claim.limit,
            max_bytes=claim.max_bytes,
            worker_id=session.worker_id,
            holder=session.holder,
            lease_seconds=self._lease_seconds,
            fence=fence,
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
            Packed(assignments_message(convert.add_assignment_from_row, rows[i:j]), size, j - i)
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
                assignments_message(convert.add_assignment_from_row, [row])
            except Exception as exc:
                found[i] = exc
        return found

    def may_hand_off(self, rows: Iterable[store.NewRow]) -> bool:
        """Whether fresh submits may go straight to waiting workers: not to a paused queue
        (nor before this term has read which are)."""
        pauses = self.pauses
        return all(pauses.may_hand_off(r.tenant, r.task.queue) for r in rows)

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
