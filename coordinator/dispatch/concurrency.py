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
is the plain one, which leaves keyed tasks alone. So a tenant's first keyed tasks after a
quiet spell wait up to a second before their first claim.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from conveyor.coordinator.lifecycle.transitions import RUNNING, TENANT, Transitions
from conveyor.coordinator.store import tasks as store


def _nothing() -> None:
    return None


class ConcurrencyKeys:
    """The tenants with keyed tasks ready, and the wake-up when a slot frees."""

    def __init__(self) -> None:
        self.tenants: frozenset[str] = frozenset()
        self.wake: Callable[[], None] = _nothing
        """Runs the dispatcher's next round (set by the dispatcher)."""

    def reset(self) -> None:
        self.tenants = frozenset()

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self.tenants = frozenset(await store.keyed_tenants(conn))

    def on_transitions(self, batch: Transitions) -> None:
        """A task of a tenant with keyed work left RUNNING: a slot may be free."""
        tenants = self.tenants
        if tenants and any(row[TENANT] in tenants for row in batch.left(RUNNING)):
            self.wake()
