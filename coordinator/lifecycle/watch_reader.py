"""Reads the watched tasks for every WatchTask stream of this coordinator at once.

One supervised service (``supervisor.py``) for the life of the process, not of a term:
WatchTask streams are reads. Each round reads the tasks marked as changed (woken by
``TaskWatchers.changed`` and by new watches), and every ``WATCH_REFRESH`` seconds every
watched task, in one statement per ``READ_CHUNK`` tasks, and offers each watch its row
(see ``watchers.py``). A failed read ends the streams still waiting for their first row
(UNAVAILABLE, which clients reopen); the others keep their last row until the next round.
"""

from __future__ import annotations

import asyncio

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import StoreUnavailable, domain_error
from conveyor.coordinator.lifecycle.watchers import WATCH_REFRESH
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service

READ_CHUNK = 1000
"""Tasks read per statement."""


class WatchReader(Service):
    name = "watch-reader"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.reads = 0
        """Statements run (for tests: watchers share them)."""
        self._next_refresh = 0.0
        deps.watchers.on_due = self.wake

    async def step(self) -> float:
        watchers = self.deps.watchers
        now = asyncio.get_running_loop().time()
        everything = now >= self._next_refresh
        if everything:
            self._next_refresh = now + WATCH_REFRESH
        keys = watchers.take_due(everything=everything)
        if keys:
            try:
                async with self.deps.db.read() as conn:
                    for start in range(0, len(keys), READ_CHUNK):
                        chunk = keys[start : start + READ_CHUNK]
                        self.reads += 1
                        rows = await store.get_many(conn, chunk)
                        watchers.deliver(chunk, {(r["tenant"], str(r["id"])): r for r in rows})
            except Exception as exc:
                error = domain_error(exc)
                watchers.fail(keys, error or StoreUnavailable(f"{type(exc).__name__}: {exc}"))
                raise
        return max(0.0, self._next_refresh - asyncio.get_running_loop().time())
