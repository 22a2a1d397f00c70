"""The WatchTask streams of this coordinator, served from shared reads.

A stream registers a :class:`Watch` for its task and waits on it; it never reads
PostgreSQL itself. The :class:`~conveyor.coordinator.lifecycle.watch_reader.WatchReader`
reads, in one statement, every watched task that changed (marked by this module's
after-commit listener, ``transitions.py``: one dict lookup per task of each committed
batch, nothing when no one watches; changes other coordinators commit are marked by the
relay of ``task_events.py``) and, every ``WATCH_REFRESH`` seconds as a safety net, every
watched task; each watch keeps only the latest row it was offered (no queue grows behind
a slow stream). So a thousand watchers cost the database what one does: one indexed read
per change and one per refresh.

Each tenant may have at most ``max_per_tenant`` watches open on this coordinator; past
it, WatchTask is refused with QUOTA_EXCEEDED (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from conveyor.coordinator.errors import ConveyorError, QuotaExceeded, TaskNotFound
from conveyor.coordinator.lifecycle.transitions import Transitions

WATCH_REFRESH = 2.0
"""Seconds between re-reads of every watched task, changed or not (a safety net for a
missed wake-up; it also refreshes what depends on more than the row, such as
``unserved``)."""
QUOTA_SUBJECT = "watch_streams"
RETRY_AFTER = 1.0
"""Told to a refused watcher: streams end as their tasks finish."""

TaskKey = tuple[str, str]
"""(tenant, task id as canonical lowercase text)."""


class Watch:
    """One stream's view of its task: the latest row the reader offered it."""

    def __init__(self, tenant: str, task_id: str) -> None:
        self.tenant = tenant
        self.task_id = task_id
        self._row: Any = None
        self._offered = False
        self._error: ConveyorError | None = None
        self._event = asyncio.Event()

    def offer(self, row: Any) -> None:
        """The task as just read; None when the tenant has no such task."""
        self._row, self._offered, self._error = row, True, None
        self._event.set()

    def fail(self, error: ConveyorError) -> None:
        """The first read failed (the store is down): the stream ends with ``error``.
        After a first row, a failed read is only a missed refresh."""
        if not self._offered:
            self._error = error
            self._event.set()

    async def next(self) -> Any:
        """Waits for the next row offered (the latest, if several were).

        Raises:
            TaskNotFound: The tenant has no such task.
        """
        await self._event.wait()
        self._event.clear()
        if self._error is not None:
            raise self._error
        if self._row is None:
            raise TaskNotFound(self.task_id)
        return self._row


class TaskWatchers:
    """The open watches, by task; see the module docstring."""

    def __init__(self, *, max_per_tenant: int = 0) -> None:
        self.max_per_tenant = max_per_tenant
        """Watches each tenant may have open at once; 0: no limit."""
        self._by_id: dict[str, set[Watch]] = {}
        self._per_tenant: collections.Counter[str] = collections.Counter()
        self._due: set[TaskKey] = set()
        self.on_due: Callable[[], None] = lambda: None
        """Called when a watched task is due for a read (the reader's wake-up)."""
        self.on_first_watch: Callable[[str], None] = lambda tenant: None
        """Called when a tenant's first watch opens here (the relay of other
        coordinators' changes says this one wants that tenant's: ``task_events.py``)."""

    def __len__(self) -> int:
        return sum(self._per_tenant.values())

    @contextmanager
    def watch(self, tenant: str, task_id: uuid.UUID | str) -> Iterator[Watch]:
        """Registers a watch for the duration of the ``with`` block; its first row comes
        with the reader's next round.

        Raises:
            QuotaExceeded: The tenant has ``max_per_tenant`` watches open already.
        """
        if self.max_per_tenant and self._per_tenant[tenant] >= self.max_per_tenant:
            raise QuotaExceeded(
                QUOTA_SUBJECT,
                f"tenant {tenant!r} has {self._per_tenant[tenant]} WatchTask streams open on "
                f"this coordinator, the most it may (max_watch_streams); close streams it "
                f"no longer reads (they also end when their tasks finish)",
                retry_after=RETRY_AFTER,
            )
        watch = Watch(tenant, str(task_id))
        self._by_id.setdefault(watch.task_id, set()).add(watch)
        self._per_tenant[tenant] += 1
        if self._per_tenant[tenant] == 1:
            self.on_first_watch(tenant)
        self._mark_due([(tenant, watch.task_id)])
        try:
            yield watch
        finally:
            self._per_tenant[tenant] -= 1
            if not self._per_tenant[tenant]:
                del self._per_tenant[tenant]
            watches = self._by_id.get(watch.task_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._by_id[watch.task_id]

    def tenants(self) -> list[str]:
        """The tenants with watches open here."""
        return list(self._per_tenant)

    def on_transitions(self, batch: Transitions) -> None:
        """The after-commit listener: marks the batch's watched tasks for a read."""
        if self._by_id:
            self.changed(batch.ids())

    def changed(self, task_ids: Iterable[uuid.UUID | str]) -> None:
        """Marks these tasks (ids as UUIDs or canonical lowercase text) for a read, if
        watched."""
        if not self._by_id:
            return
        keys = [(w.tenant, w.task_id) for i in task_ids for w in self._by_id.get(str(i), ())]
        if keys:
            self._mark_due(keys)

    def _mark_due(self, keys: Iterable[TaskKey]) -> None:
        self._due.update(keys)
        self.on_due()

    # -- the reader's side -----------------------------------------------------------------

    def take_due(self, *, everything: bool) -> list[TaskKey]:
        """The tasks to read now: those marked, or every watched one."""
        if everything:
            self._due.clear()
            return sorted({(w.tenant, w.task_id) for ws in self._by_id.values() for w in ws})
        due, self._due = self._due, set()
        return sorted(due)

    def deliver(self, keys: Iterable[TaskKey], rows: Mapping[TaskKey, Any]) -> None:
        """Offers each watch of ``keys`` its row (None: not found)."""
        for tenant, task_id in keys:
            row = rows.get((tenant, task_id))
            for watch in self._by_id.get(task_id, ()):
                if watch.tenant == tenant:
                    watch.offer(row)

    def fail(self, keys: Iterable[TaskKey], error: ConveyorError) -> None:
        """The read of ``keys`` failed: watches still waiting for a first row end."""
        for tenant, task_id in keys:
            for watch in self._by_id.get(task_id, ()):
                if watch.tenant == tenant:
                    watch.fail(error)
