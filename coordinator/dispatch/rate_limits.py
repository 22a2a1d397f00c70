"""Rate limits at dispatch: token buckets the leader spends from when it claims.

A limit (``store/rate_limits.py``) is a token bucket of one tenant ('*': every tenant
together) over one queue ('' every queue) and one task type ('' every type): ``rate``
tokens a second, at most ``burst`` saved up. Dispatch (not submit) is what it limits:
a task starts only with a token of every bucket that covers it, so however many
workers there are, together they start no more than the rate allows.

The buckets live in the leader's memory, where the dispatcher decides each claim: before
a claim, :meth:`RateLimits.caps` refills the buckets that cover the session's queues and
types and turns their whole tokens into caps the claim statement applies in SQL (per
(queue, type) pair in the LIMIT of its index scan, per queue, per type and per tenant as
running counts); after it, :meth:`RateLimits.spend` takes what was claimed. So the work
is per claim, never per task in Python, and nothing of it runs while no limit covers the
session (the claim is then the statement of a queue without limits, same plan).

Failover never starts from a full burst: the buckets are read from the table about once
a second (:meth:`RateLimits.refresh`, by the dispatcher, which also writes their levels
back for ``ListQueues`` on any coordinator), and a leader that takes office starts every
bucket empty (:meth:`RateLimits.reset`): the old leader may have spent, after it last
wrote its levels, what those levels say is left. Until the first read of a term, no
claim is made and no submit is handed off to a worker (the limits are not known yet).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from conveyor.coordinator.store import rate_limits as store
from conveyor.coordinator.store.rate_limits import ALL_TENANTS

REFRESH_SECONDS = 1.0
"""How often the dispatcher reads the limits again and writes the levels back."""
WAKE_MIN = 0.01
"""The shortest wait for a bucket to refill: a round per token would cost more than the
tokens are worth at high rates."""


@dataclass(slots=True)
class Bucket:
    """One token bucket (see the module docstring)."""

    tenant: str
    queue: str
    type: str
    rate: float
    burst: int
    stamp: float
    """When ``level`` was last refilled (``time.monotonic``)."""
    level: float = 0.0

    def refill(self, now: float) -> None:
        self.level = min(float(self.burst), self.level + self.rate * (now - self.stamp))
        self.stamp = now

    def covers(self, queue: str, type_: str) -> bool:
        return (not self.queue or self.queue == queue) and (not self.type or self.type == type_)

    @property
    def scope(self) -> str:
        """``cluster`` for a limit across all tenants, else ``tenant``."""
        return "cluster" if self.tenant == ALL_TENANTS else "tenant"


class Caps(NamedTuple):
    """What one claim may take: the arrays of ``store.tasks.claim_limited``."""

    pairs: list[tuple[str, str, int]]
    """(queue, type, at most) for every pair the session takes that has tokens."""
    queues: list[tuple[str, int]]
    """(queue, at most) for queues limited as a whole."""
    types: list[tuple[str, int]]
    """(type, at most) for types limited in every queue."""
    total: int
    """At most this many in all."""
    buckets: list[Bucket]
    """The buckets that cover the claim, to spend from."""


class RateLimits:
    """The leader's token buckets (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_tenant: dict[str, list[Bucket]] = {}
        self._read_at = -math.inf
        self.current = False
        """Whether the limits were read in this term (else nothing is dispatched)."""
        self._held: list[Bucket] = []
        """Buckets that held a claim back since the last :meth:`wake_after`."""
        self.holds: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """Claims held back, per bucket (tenant, queue, type), for the metrics."""

    def reset(self) -> None:
        """A new term: every bucket starts empty, read again before the first claim."""
        self._by_tenant = {}
        self.current = False
        self._read_at = -math.inf

    def invalidate(self) -> None:
        """A limit changed (set or deleted here): read them again before the next claim."""
        self._read_at = -math.inf

    def stale(self) -> bool:
        return self._clock() - self._read_at >= REFRESH_SECONDS

    def buckets(self) -> list[Bucket]:
        return [b for buckets in self._by_tenant.values() for b in buckets]

    async def refresh(self, conn: asyncpg.Connection) -> None:
        """Writes the levels back, then reads the limits (a new bucket starts empty, a
        changed one keeps its level up to its new burst)."""
        now = self._clock()
        known = {(b.tenant, b.queue, b.type): b for b in self.buckets()}
        for bucket in known.values():
            bucket.refill(now)
        await store.save_levels(conn, [(*key, b.level) for key, b in known.items()])
        rows = await store.load_all(conn)
        by_tenant: dict[str, list[Bucket]] = {}
        for row in rows:
            key = (row["tenant"], row["queue"], row["type"])
            bucket = known.get(key) or Bucket(*key, row["rate"], row["burst"], stamp=now)
            bucket.rate, bucket.burst = row["rate"], row["burst"]
            bucket.level = min(bucket.level, float(bucket.burst))
            by_tenant.setdefault(key[0], []).append(bucket)
        self._by_tenant = by_tenant
        self._read_at = now
        self.current = True

    def covering(self, tenant: str, queue: str, type_: str) -> bool:
        """Whether some bucket covers this kind of task, or the limits are not known yet
        (then a submit is not handed off to a worker: the claim decides)."""
        if not self.current:
            return True
        if not self._by_tenant:
            return False
        return any(
            b.covers(queue, type_)
            for b in (*self._by_tenant.get(tenant, ()), *self._by_tenant.get(ALL_TENANTS, ()))
        )

    def caps(
        self, tenant: str, queues: Sequence[str], types: Sequence[str], limit: int
    ) -> Caps | None:
        """What a claim of ``limit`` tasks for this tenant's ``queues`` and ``types`` may
        take; None when no bucket covers it (the claim without limits)."""
        if not self._by_tenant:
            return None
        queue_set, type_set = set(queues), set(types)
        buckets = [
            b
            for b in (*self._by_tenant.get(tenant, ()), *self._by_tenant.get(ALL_TENANTS, ()))
            if (not b.queue or b.queue in queue_set) and (not b.type or b.type in type_set)
        ]
        if not buckets:
            return None
        now = self._clock()
        total = limit
        per_pair: dict[tuple[str, str], int] = {}
        per_queue: dict[str, int] = {}
        per_type: dict[str, int] = {}
        for b in buckets:
            b.refill(now)
            whole = int(b.level)
            if b.queue and b.type:
                per_pair[(b.queue, b.type)] = min(whole, per_pair.get((b.queue, b.type), limit))
            elif b.queue:
                per_queue[b.queue] = min(whole, per_queue.get(b.queue, limit))
            elif b.type:
                per_type[b.type] = min(whole, per_type.get(b.type, limit))
            else:
                total = min(total, whole)
        pairs = []
        for q in queues:
            for t in types:
                cap = min(
                    total,
                    per_pair.get((q, t), limit),
                    per_queue.get(q, limit),
                    per_type.get(t, limit),
                )
                if cap > 0:
                    pairs.append((q, t, cap))
        return Caps(pairs, list(per_queue.items()), list(per_type.items()), total, buckets)

    def spend(self, caps: Caps, rows: Iterable[Any]) -> None:
        """Takes a token per claimed task from each bucket that covers it; a bucket that
        gave its last whole token (or had none) held the claim back."""
        claimed = collections.Counter((r["queue"], r["type"]) for r in rows)
        for b in caps.buckets:
            b.level -= sum(n for (q, t), n in claimed.items() if b.covers(q, t))
            if b.level < 1:
                self._held.append(b)
                self.holds[(b.tenant, b.queue, b.type)] += 1

    def wake_after(self) -> float | None:
        """Seconds until a bucket that held a claim back has a token again (None when
        none did): the dispatcher's next round."""
        held, self._held = self._held, []
        if not held:
            return None
        return max(WAKE_MIN, min((1 - b.level) / b.rate for b in held))

    def levels(self) -> list[tuple[str, str, str, str, float]]:
        """(scope, tenant, queue, type, tokens) of every bucket, as of its last refill
        (the ``conveyor_rate_limit_tokens`` gauge)."""
        return [(b.scope, b.tenant, b.queue, b.type, b.level) for b in self.buckets()]
