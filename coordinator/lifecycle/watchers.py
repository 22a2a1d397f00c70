"""Wakes WatchTask streams when the tasks they watch change state.

An after-commit listener (``transitions.py``): every committed batch of transitions costs
one dict lookup per task, and nothing when no one watches. A watcher re-reads its task
from the store when woken, so a missed or coalesced wake-up loses nothing (watchers also
re-read on a slow timer).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from conveyor.coordinator.lifecycle.transitions import Transitions


class TaskWatchers:
    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watch(self, task_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """Registers a watcher for the duration of the ``with`` block."""
        key = str(task_id)
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._events.get(key)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._events[key]

    def on_transitions(self, batch: Transitions) -> None:
        if self._events:
            self.changed(batch.ids())

    def changed(self, task_ids: Iterable[uuid.UUID | str]) -> None:
        """Wakes the watchers of these tasks (ids as UUIDs or canonical lowercase text)."""
        if not self._events:
            return
        for task_id in task_ids:
            for event in self._events.get(str(task_id), ()):
                event.set()
