"""Circuit breakers per (tenant, task type), cluster-wide: the leader stops dispatching a
type whose attempts keep failing, so a broken downstream does not burn every task's
attempts at full speed.

- **Closed** (dispatching). Every attempt that ends is counted in a sliding window of
  ``breaker_window`` seconds (ten buckets): a success, or a failure (FAILED, TIMED_OUT,
  LEASE_EXPIRED; attempts that never started, were interrupted or cancelled say nothing
  about the type). With at least ``breaker_min_requests`` attempts in the window and a
  failure rate of ``breaker_failure_rate`` or more, the breaker **opens**.
- **Open**: no task of the type is claimed or handed off for ``breaker_cooldown``
  seconds. Its tasks wait PENDING and lose no attempt.
- **Half-open**: then at most ``breaker_probes`` tasks are let through (a claim of that
  type alone, with that limit). A failure opens it again for another cool-down; as many
  successes as probes **close** it with an empty window.

The breakers are fed from the one transition seam (:meth:`Breakers.on_transitions`, an
after-commit listener on every attempt that ended: results, expiries, evictions), per
batch, and decide per claim (:meth:`Breakers.allowed`: the session's types without the
open ones, the same tuple when none is, so the claim is the same statement). An open or
half-open breaker is written to ``circuit_breakers`` (migration 0008) by the dispatcher's
once-a-second refresh; a leader that takes office reads them back, so a failover never
closes a breaker early (a half-open one starts its probes again); closed breakers start
with an empty window. ``breaker_failure_rate`` 0 (the default) turns them off: the
listener returns at once and nothing is read or written.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from conveyor.coordinator.lifecycle.transitions import (
    OUTCOME,
    RUNNING,
    TENANT,
    TYPE,
    Transitions,
)
from conveyor.coordinator.store import breakers as store
from conveyor.v1 import task_pb2

BUCKETS = 10
"""Buckets of the sliding window."""

_FAILED = frozenset(
    {
        task_pb2.ATTEMPT_OUTCOME_FAILED,
        task_pb2.ATTEMPT_OUTCOME_TIMED_OUT,
        task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED,
    }
)
_SUCCEEDED = task_pb2.ATTEMPT_OUTCOME_SUCCEEDED


class State(enum.IntEnum):
    """The ``conveyor_circuit_breaker_state`` gauge's values."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class Settings:
    failure_rate: float
    """Open at this failure rate or more (0: breakers off)."""
    min_requests: int
    window: float
    cooldown: float
    probes: int


@dataclass(slots=True)
class Breaker:
    tenant: str
    type: str
    state: State = State.CLOSED
    opened_at: float = 0.0
    """When it last opened (the clock of :class:`Breakers`)."""
    opened_wall: datetime | None = None
    successes: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    failures: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    bucket: int = 0
    """The index of the current bucket (the clock in bucket widths)."""
    probes_sent: int = 0
    probes_passed: int = 0

    def failure_rate(self) -> float:
        total = sum(self.successes) + sum(self.failures)
        return sum(self.failures) / total if total else 0.0


class Breakers:
    """The leader's circuit breakers (see the module docstring)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.enabled = settings.failure_rate > 0
        self._clock = clock
        self._breakers: dict[tuple[str, str], Breaker] = {}
        self._blocked: dict[str, set[str]] = {}
        """Per tenant, the types not closed: the only ones :meth:`allowed` looks at."""
        self._dirty: set[tuple[str, str]] = set()
        self.wake: Callable[[], None] = lambda: None

    # -- the seam ------------------------------------------------------------------------

    def on_transitions(self, batch: Transitions) -> None:
        """Counts the attempts of a batch that ended, per (tenant, type) and outcome."""
        if not self.enabled:
            return
        ended = collections.Counter(
            (row[TENANT], row[TYPE], row[OUTCOME]) for row in batch.left(RUNNING)
        )
        if ended:
            self.count(ended)

    def count(self, ended: collections.Counter[tuple[str, str, int | None]]) -> None:
        now = self._clock()
        for (tenant, type_, outcome), n in ended.items():
            failed = outcome in _FAILED
            if not failed and outcome != _SUCCEEDED:
                continue
            breaker = self._breakers.get((tenant, type_))
            if breaker is None:
                breaker = self._breakers[(tenant, type_)] = Breaker(tenant, type_)
            self._advance(breaker, now)
            if breaker.state is State.CLOSED:
                (breaker.failures if failed else breaker.successes)[breaker.bucket % BUCKETS] += n
                total = sum(breaker.successes) + sum(breaker.failures)
                if (
                    total >= self.settings.min_requests
                    and breaker.failure_rate() >= self.settings.failure_rate
                ):
                    self._open(breaker, now)
            elif breaker.state is State.HALF_OPEN:
                if failed:
                    self._open(breaker, now)
                else:
                    breaker.probes_passed += n
                    if breaker.probes_passed >= self.settings.probes:
                        self._close(breaker)

    # -- per claim -----------------------------------------------------------------------

    def allowed(self, tenant: str, types: tuple[str, ...]) -> tuple[str, ...]:
        """``types`` without those whose breaker is not closed (the same tuple when all
        are closed)."""
        blocked = self._blocked.get(tenant)
        if not blocked:
            return types
        self._tick(tenant)
        blocked = self._blocked.get(tenant)
        if not blocked:
            return types
        return tuple(t for t in types if t not in blocked)

    def probing(self, tenant: str, types: Sequence[str]) -> list[tuple[str, int]]:
        """(type, probes still to send) of the half-open breakers of these types."""
        out: list[tuple[str, int]] = []
        for t in self._blocked.get(tenant, ()):
            breaker = self._breakers[(tenant, t)]
            left = self.settings.probes - breaker.probes_sent
            if breaker.state is State.HALF_OPEN and left > 0 and t in types:
                out.append((t, left))
        return out

    def sent_probes(self, tenant: str, type_: str, n: int) -> None:
        self._breakers[(tenant, type_)].probes_sent += n

    def blocks(self, tenant: str, type_: str) -> bool:
        """Whether a fresh submit of this type may not be handed straight to a worker."""
        return type_ in self._blocked.get(tenant, ())

    # -- state changes ---------------------------------------------------------------------

    def _advance(self, breaker: Breaker, now: float) -> None:
        """Moves the window on to ``now``, emptying the buckets it passed."""
        current = int(now / (self.settings.window / BUCKETS))
        passed = min(current - breaker.bucket, BUCKETS)
        for step in range(1, passed + 1):
            index = (breaker.bucket + step) % BUCKETS
            breaker.successes[index] = breaker.failures[index] = 0
        breaker.bucket = current

    def _tick(self, tenant: str) -> None:
        """Open breakers whose cool-down is over become half-open."""
        now = self._clock()
        for t in list(self._blocked.get(tenant, ())):
            breaker = self._breakers[(tenant, t)]
            if breaker.state is State.OPEN and now - breaker.opened_at >= self.settings.cooldown:
                breaker.state = State.HALF_OPEN
                breaker.probes_sent = breaker.probes_passed = 0
                self._dirty.add((tenant, t))
                self.wake()

    def _open(self, breaker: Breaker, now: float) -> None:
        breaker.state = State.OPEN
        breaker.opened_at = now
        breaker.opened_wall = datetime.now(UTC)
        self._blocked.setdefault(breaker.tenant, set()).add(breaker.type)
        self._dirty.add((breaker.tenant, breaker.type))

    def _close(self, breaker: Breaker) -> None:
        breaker.state = State.CLOSED
        breaker.successes = [0] * BUCKETS
        breaker.failures = [0] * BUCKETS
        self._blocked.get(breaker.tenant, set()).discard(breaker.type)
        self._dirty.add((breaker.tenant, breaker.type))
        self.wake()

    # -- failover --------------------------------------------------------------------------

    def reset(self) -> None:
        """A new term: read again from the table before the first claim."""
        self._breakers = {}
        self._blocked = {}
        self._dirty = set()
        self._loaded = False

    _loaded = False

    async def refresh(self, conn: asyncpg.Connection) -> None:
        """Writes the breakers that changed; at the start of a term, reads the open ones
        (a half-open one opens again with what is left of its cool-down: its probes start
        over)."""
        if not self.enabled:
            return
        if not self._loaded:
            now, wall = self._clock(), datetime.now(UTC)
            for row in await store.load_all(conn):
                breaker = Breaker(row["tenant"], row["type"], State.OPEN)
                breaker.opened_wall = row["opened_time"]
                breaker.opened_at = now - (wall - row["opened_time"]).total_seconds()
                self._breakers[(breaker.tenant, breaker.type)] = breaker
                self._blocked.setdefault(breaker.tenant, set()).add(breaker.type)
            self._loaded = True
        if self._dirty:
            changed = [self._breakers[key] for key in self._dirty]
            self._dirty = set()
            await store.save(
                conn, [(b.tenant, b.type, int(b.state), b.opened_wall) for b in changed]
            )

    # -- reading -------------------------------------------------------------------------

    def of_tenant(self, tenant: str) -> list[Breaker]:
        """The tenant's breakers that are not closed, by type."""
        self._tick(tenant)
        return sorted(
            (self._breakers[(tenant, t)] for t in self._blocked.get(tenant, ())),
            key=lambda b: b.type,
        )

    def states(self) -> list[tuple[str, str, int]]:
        """(tenant, type, state) of every breaker (the gauge)."""
        return [(b.tenant, b.type, int(b.state)) for b in self._breakers.values()]
