"""Paused queues, as the leader dispatches by them (PauseQueue, ResumeQueue).

A paused queue accepts submits and dispatches nothing; the tasks it holds that are
running finish. The pauses live in PostgreSQL (``queue_settings``, ``store/queues.py``)
and in the leader's memory, here: the dispatch policy leaves a paused queue out of each
claim (one set look-up per queue of a session per round, none while nothing is paused),
and the submit hand-off skips it, so no statement of the hot path changes.

The set is loaded from the table when the leader's dispatcher first runs in a term
(:meth:`QueuePauses.load`) and forgotten when it stops: until it is loaded, nothing is
handed off (the claim waits for the load anyway). Pause and resume are leader-only calls
whose writes are fenced: a pause either committed under an epoch whose successor loads
it, or fails. A change made while a load reads is applied over what the load found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from conveyor.coordinator.store import queues as store
from conveyor.coordinator.store.db import Database


class QueuePauses:
    """The (tenant, queue) pairs paused, for this term of office (see the module)."""

    def __init__(self) -> None:
        self._paused: set[tuple[str, str]] = set()
        self._during_load: dict[tuple[str, str], bool] | None = None
        self.current = False
        """Whether the set was loaded in this term (else nothing is handed off)."""

    async def load(self, db: Database) -> None:
        """Reads the paused queues from the table (the dispatcher, once per term)."""
        self._during_load = {}
        try:
            async with db.read() as conn:
                found = await store.paused(conn)
            for key, paused in self._during_load.items():
                if paused:
                    found.add(key)
                else:
                    found.discard(key)
        finally:
            self._during_load = None
        self._paused = found
        self.current = True

    def forget(self) -> None:
        """This coordinator left office: the next term loads the pauses again."""
        self.current = False
        self._paused = set()

    def set(self, tenant: str, queue: str, paused: bool) -> None:
        """Records a pause or resume that committed."""
        key = (tenant, queue)
        if self._during_load is not None:
            self._during_load[key] = paused
        if paused:
            self._paused.add(key)
        else:
            self._paused.discard(key)

    def paused(self, tenant: str, queue: str) -> bool:
        return (tenant, queue) in self._paused

    def open_queues(self, tenant: str, queues: Sequence[str]) -> Sequence[str]:
        """The queues of ``queues`` a claim for ``tenant`` may take from."""
        paused = self._paused
        if not paused:
            return queues
        return [q for q in queues if (tenant, q) not in paused]

    def may_hand_off(self, tenant: str, queue: str) -> bool:
        """Whether a fresh submit to this queue may go straight to a waiting worker."""
        return self.current and (tenant, queue) not in self._paused

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(sorted(self._paused))
