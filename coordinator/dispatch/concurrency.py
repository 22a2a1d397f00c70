"""Concurrency keys: at most N tasks with the same key run at once, cluster-wide.

A task may carry a ``concurrency_key`` (a customer id, an account) and a
``concurrency_limit`` (``SubmitTaskRequest``). Nothing about the slots lives in memory:
the keyed claim (``store.tasks.claim_limited(keyed=True)``) counts the RUNNING rows of
each key (the partial index ``tasks_running_keyed``) and the rows ahead of a task in the
claim, and skips full keys in its scan, so a key at its limit never holds back tasks
with other keys, and the limit holds across workers and failover. A slot is free as soon
as a task leaves RUNNING, whatever the transition (result, expiry, eviction, cancel):
the row is no longer counted. :meth:`ConcurrencyKeys.on_transitions`, an after-commit
listener, then wakes the dispatcher so a waiting task of that key starts at once.

The leader keeps only which tenants have keyed tasks ready (read with the rate limits,
about once a second): the keyed claim runs only for their workers, and every other claim
is the plain one, which leaves keyed tasks alone. A tenant stays in that set for
:data:`KEYED_STICKY` seconds after its keyed tasks were last seen ready: a tenant whose
keyed tasks trickle in, each taken before the next read, would otherwise leave the set
between tasks, and each new one would wait for the next read (up to a second: `conveyor
bench --concurrency-keys` measured a pickup p99 of 0.9-1.8 s at 100 tasks/s). So only a
tenant's first keyed tasks after a quiet spell that long wait up to a second for their
first claim; the cost of staying is the keyed claim, a little dearer than the plain one,
for that tenant's workers meanwhile.

Keys take turns: the keyed claim visits a (queue, type)'s keys one by one and orders
what it takes by turns (every key's best task, then every key's second, ...), so one
key's deep backlog does not stand in front of another key's tasks. It looks at up to
``store.tasks.MAX_KEYS_PER_CLAIM`` keys per pair, starting after the key where the
pair's last claim stopped (:meth:`ConcurrencyKeys.after`, kept here per (tenant, queue,
type); a new term starts from the first key), so with more keys than one claim serves
every key still gets its turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import asyncpg

from conveyor.coordinator.lifecycle.transitions import RUNNING, TENANT, Transitions
from conveyor.coordinator.store import tasks as store

KEYED_STICKY = 300.0
"""Seconds a tenant keeps the keyed claim after its keyed tasks were last seen ready."""


def _nothing() -> None:
    return None


class ConcurrencyKeys:
    """The tenants with keyed tasks ready, and the wake-up when a slot frees."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenants: frozenset[str] = frozenset()
        self.wake: Callable[[], None] = _nothing
        """Runs the dispatcher's next round (set by the dispatcher)."""
        self._stops: dict[tuple[str, str, str], str] = {}
        self._seen: dict[str, float] = {}
        """When each tenant's keyed tasks were last seen ready."""
        self._clock = clock

    def reset(self) -> None:
        self.tenants = frozenset()
        self._stops.clear()
        self._seen.clear()

    def after(self, tenant: str, pairs: Iterable[tuple[str, str, int]]) -> list[str]:
        """Per (queue, type, cap) of ``pairs``, the key its last keyed claim stopped at
        ("": none), where the next one starts."""
        stops = self._stops
        return [stops.get((tenant, queue, type_), "") for queue, type_, _ in pairs]

    def served(self, tenant: str, rows: Sequence[asyncpg.Record]) -> None:
        """A keyed claim took ``rows`` (with their queue, type and concurrency_key): the
        next claim of each of their pairs starts after the last key served."""
        served: dict[tuple[str, str, str], list[str]] = {}
        for row in rows:
            served.setdefault((tenant, row["queue"], row["type"]), []).append(
                row["concurrency_key"]
            )
        stops = self._stops
        for pair, keys in served.items():
            stops[pair] = store.last_key(keys, stops.get(pair, ""))

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self.seen(await store.keyed_tenants(conn))

    def seen(self, ready: Iterable[str]) -> None:
        """The tenants with keyed tasks ready now: they, and those seen within
        :data:`KEYED_STICKY` seconds, get the keyed claim."""
        now = self._clock()
        seen = self._seen
        for tenant in ready:
            seen[tenant] = now
        for tenant in [t for t, at in seen.items() if now - at > KEYED_STICKY]:
            del seen[tenant]
        self.tenants = frozenset(seen)

    def on_transitions(self, batch: Transitions) -> None:
        """A task of a tenant with keyed work left RUNNING: a slot may be free."""
        tenants = self.tenants
        if tenants and any(row[TENANT] in tenants for row in batch.left(RUNNING)):
            self.wake()
