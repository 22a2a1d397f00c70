"""WatchTasks: the state changes of many tasks, to streams on any coordinator.

A stream (:class:`EventStream`) names a tenant and a filter (queues, types, new states,
labels) and holds the matching changes not yet sent, at most ``max_watch_buffer``: a
stream that falls further behind is ended with WATCH_TOO_SLOW, never given a longer
queue. The :class:`TaskEventHub` feeds them, from two sources:

- the changes this coordinator commits, through its after-commit listener
  (``transitions.py``), which returns at once unless some coordinator watches one of the
  batch's tenants (one set lookup per task of the batch then, nothing per task before);
- the changes other coordinators commit, through PostgreSQL LISTEN/NOTIFY: a coordinator
  with streams of a tenant says so on :data:`INTEREST_CHANNEL` when the first one opens
  and every :data:`INTEREST_RENEW` seconds after; a coordinator that commits a change of a
  tenant someone else watches sends it on :data:`EVENTS_CHANNEL`, batched (a few
  NOTIFYs per commit, from this hub's own connection, never in the committing
  transaction).

WatchTask streams (one task each, ``watchers.py``) ride on the same relay: a coordinator
with such watches says so for their tenants like for its own streams
(:meth:`TaskEventHub.watch_tasks`), and the changes other coordinators send of those
tenants mark the watched tasks for a read, so a follower's WatchTask sees what the leader
commits within milliseconds, not at the watch reader's next refresh.

A stream starts with the changes after it opened: the first (empty) response says it is
open here; another coordinator learns of it within a few milliseconds (one NOTIFY), so
a change it commits in that moment may be missed. When the listening connection is lost,
notifications may have been lost with it: the streams end with UNAVAILABLE (reopen). A
label filter needs the tasks' labels, which transitions do not carry: those streams'
changes are read in one statement per round, before they are sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from conveyor.coordinator.errors import (
    ConveyorError,
    QuotaExceeded,
    StoreUnavailable,
    WatchTooSlow,
)
from conveyor.coordinator.lifecycle.transitions import (
    ATTEMPT,
    FROM_STATE,
    ID,
    QUEUE,
    STATE,
    TENANT,
    TYPE,
    AfterCommit,
    Transitions,
)
from conveyor.coordinator.store import task_events as store
from conveyor.coordinator.store.listener import listening, reconnecting
from conveyor.coordinator.supervisor import stop_task

_log = logging.getLogger("conveyor.coordinator.task_events")

EVENTS_CHANNEL = "conveyor_task_events"
INTEREST_CHANNEL = "conveyor_watch_interest"
INTEREST_TTL = 10.0
"""Seconds another coordinator's interest in a tenant lasts unless renewed."""
INTEREST_RENEW = 3.0
MAX_NOTIFY_BYTES = 7000
"""A NOTIFY payload must stay under 8000 bytes."""
MAX_OUTGOING = 100_000
"""Changes waiting to be sent to other coordinators (or for their labels); past it, the
affected tenants' streams are told they missed changes."""
QUOTA_SUBJECT = "watch_streams"

Event = tuple[str, str, str, int, int, int, float]
"""(task id, queue, type, from_state, state, attempt, unix time)."""


@dataclass(frozen=True)
class WatchFilter:
    """What a stream wants; an empty set matches anything."""

    queues: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    states: frozenset[int] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, event: Event) -> bool:
        """Whether ``event`` passes the queue, type and state filters (not labels)."""
        return (
            (not self.queues or event[1] in self.queues)
            and (not self.types or event[2] in self.types)
            and (not self.states or event[4] in self.states)
        )

    def labels_match(self, labels: Mapping[str, str] | None) -> bool:
        return labels is not None and all(labels.get(k) == v for k, v in self.labels)


class EventStream:
    """One WatchTasks stream's changes waiting to be sent (see the module docstring)."""

    def __init__(self, tenant: str, flt: WatchFilter, limit: int) -> None:
        self.tenant = tenant
        self.filter = flt
        self._limit = limit
        self._waiting: list[Event] = []
        self._error: ConveyorError | None = None
        self._ready = asyncio.Event()

    def offer(self, events: Iterable[Event]) -> None:
        """Keeps the events that match (the labels were checked by the caller)."""
        if self._error is not None:
            return
        matching = [e for e in events if self.filter.matches(e)]
        if not matching:
            return
        if len(self._waiting) + len(matching) > self._limit:
            self._waiting = []
            self.end(WatchTooSlow(f"more than {self._limit} task changes were waiting for it"))
            return
        self._waiting += matching
        self._ready.set()

    def end(self, error: ConveyorError) -> None:
        """Ends the stream with ``error`` once what it holds is sent... or at once: the
        changes still waiting are dropped, since the stream is incomplete anyway."""
        if self._error is None:
            self._error = error
            self._waiting = []
            self._ready.set()

    async def next(self) -> list[Event]:
        """The changes waiting (at least one); raises the error that ended the stream."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        events, self._waiting = self._waiting, []
        return events


class TaskEventHub:
    """This coordinator's WatchTasks streams and its share of the event relay."""

    def __init__(
        self,
        after_commit: AfterCommit,
        dsn: str,
        node_id: str,
        *,
        max_per_tenant: int,
        buffer_limit: int,
    ) -> None:
        self._dsn = dsn
        self._node = node_id
        self.max_per_tenant = max_per_tenant
        self.buffer_limit = buffer_limit
        self._streams: dict[str, set[EventStream]] = {}
        self._remote: dict[str, float] = {}
        """Tenants other coordinators watch, and until when (monotonic time)."""
        self._outgoing: list[tuple[str, Event]] = []
        self._labelled: list[tuple[str, Event]] = []
        self._lost: set[str] = set()
        self._announce: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        """Set while the relay's connection listens (for tests and the first response)."""
        self._watched_tenants: Callable[[], Iterable[str]] = tuple
        self._watched_changed: Callable[[Iterable[str]], None] = lambda ids: None
        after_commit.listen(self.on_transitions)

    def watch_tasks(
        self, tenants: Callable[[], Iterable[str]], changed: Callable[[Iterable[str]], None]
    ) -> None:
        """Relays other coordinators' changes of ``tenants()`` (those of this
        coordinator's WatchTask streams) to ``changed`` (their task ids); call
        :meth:`announce` when a tenant's first watch opens."""
        self._watched_tenants, self._watched_changed = tenants, changed

    def announce(self, tenant: str) -> None:
        """Tells the other coordinators now that this one watches ``tenant``."""
        self._announce.add(tenant)
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._relay(), name="task-events")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        self._end_all(StoreUnavailable("the coordinator is stopping; reopen the stream"))

    # -- streams ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream(self, tenant: str, flt: WatchFilter) -> Iterator[EventStream]:
        """Registers a stream for the duration of the ``with`` block.

        Raises:
            QuotaExceeded: The tenant has ``max_per_tenant`` streams open here already.
        """
        streams = self._streams.setdefault(tenant, set())
        if self.max_per_tenant and len(streams) >= self.max_per_tenant:
            raise QuotaExceeded(
                QUOTA_SUBJECT,
                f"tenant {tenant!r} has {len(streams)} WatchTasks streams open on this "
                "coordinator, the most it may (max_watch_streams); close streams it no "
                "longer reads",
                retry_after=1.0,
            )
        stream = EventStream(tenant, flt, self.buffer_limit)
        first = not streams
        streams.add(stream)
        if first:
            self._announce.add(tenant)
            self._wake.set()
        try:
            yield stream
        finally:
            streams.discard(stream)
            if not streams:
                del self._streams[tenant]

    def watched(self, tenant: str) -> bool:
        """Whether another coordinator is known to watch ``tenant`` (for tests)."""
        expiry = self._remote.get(tenant)
        return expiry is not None and expiry > time.monotonic()

    # -- the sources -----------------------------------------------------------------------

    def on_transitions(self, batch: Transitions) -> None:
        """The after-commit listener (see the module docstring)."""
        if not self._streams and not self._remote:
            return
        now = time.time()
        by_tenant: dict[str, list[Event]] = {}
        for row in batch.rows:
            tenant = row[TENANT]
            if tenant in self._streams or tenant in self._remote:
                by_tenant.setdefault(tenant, []).append(
                    (row[ID], row[QUEUE], row[TYPE], row[FROM_STATE], row[STATE], row[ATTEMPT], now)
                )
        for tenant, events in by_tenant.items():
            if tenant in self._streams:
                self._deliver(tenant, events)
            if tenant in self._remote:
                self._queue(self._outgoing, tenant, events)

    def _deliver(self, tenant: str, events: list[Event]) -> None:
        labelled = False
        for stream in self._streams.get(tenant, ()):
            if stream.filter.labels:
                labelled = True
            else:
                stream.offer(events)
        if labelled:
            self._queue(self._labelled, tenant, events)

    def _queue(self, queue: list[tuple[str, Event]], tenant: str, events: list[Event]) -> None:
        if len(queue) + len(events) > MAX_OUTGOING:
            self._lost.add(tenant)
        else:
            queue.extend((tenant, e) for e in events)
        self._wake.set()

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            message = json.loads(str(payload))
            if message.get("n") == self._node:
                return
            if channel == INTEREST_CHANNEL:
                expiry = time.monotonic() + INTEREST_TTL
                for tenant in message["tenants"]:
                    self._remote[str(tenant)] = expiry
                return
            tenant = str(message["t"])
            if message.get("lost"):
                self._end_tenant(tenant, WatchTooSlow("changes were dropped on their way here"))
                return
            events = [tuple(e) for e in message["e"]]
            if tenant in self._streams:
                self._deliver(tenant, events)
            self._watched_changed(str(e[0]) for e in events)
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("ignored a malformed %s notification: %s", channel, exc)

    # -- the relay -------------------------------------------------------------------------

    async def _relay(self) -> None:
        await reconnecting(self._session, "the task event relay", after=self._relay_lost)

    def _relay_lost(self) -> None:
        self.listening.clear()
        # Notifications may have been lost with the connection.
        self._end_all(StoreUnavailable("task changes may have been missed; reopen the stream"))

    async def _session(self) -> None:
        channels = {INTEREST_CHANNEL: self._notified, EVENTS_CHANNEL: self._notified}
        async with listening(
            self._dsn, "conveyor-coordinator-events", channels, on_lost=self._wake.set
        ) as (conn, lost):
            self.listening.set()
            self._announce |= self._interests()
            loop = asyncio.get_running_loop()
            next_renewal = loop.time()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_renewal - loop.time())):
                        await self._wake.wait()
                self._wake.clear()
                if loop.time() >= next_renewal:
                    self._announce |= self._interests()
                    next_renewal = loop.time() + INTEREST_RENEW
                    self._expire()
                await self._flush(conn)

    def _interests(self) -> set[str]:
        """The tenants this coordinator watches: its streams', its WatchTask streams'."""
        return set(self._streams) | set(self._watched_tenants())

    async def _flush(self, conn: asyncpg.Connection) -> None:
        """Sends what is due: this coordinator's interest, changes others watch, losses;
        then reads the labels the labelled streams need."""
        payloads: list[tuple[str, str]] = []
        if self._announce:
            tenants, self._announce = sorted(self._announce), set()
            payloads += [(INTEREST_CHANNEL, p) for p in _chunks(self._node, "tenants", tenants)]
        outgoing, self._outgoing = self._outgoing, []
        by_tenant: dict[str, list[Event]] = collections.defaultdict(list)
        for tenant, event in outgoing:
            by_tenant[tenant].append(event)
        for tenant, events in by_tenant.items():
            payloads += [(EVENTS_CHANNEL, p) for p in _chunks(self._node, "e", events, t=tenant)]
        lost, self._lost = self._lost, set()
        for tenant in lost:
            payloads.append((EVENTS_CHANNEL, json.dumps({"n": self._node, "t": tenant, "lost": 1})))
            self._end_tenant(tenant, WatchTooSlow("this coordinator fell behind its changes"))
        if payloads:
            await store.notify(conn, [c for c, _ in payloads], [p for _, p in payloads])
        labelled, self._labelled = self._labelled, []
        if labelled:
            labels = await store.labels(conn, [(t, e[0]) for t, e in labelled])
            grouped: dict[str, list[tuple[Event, Mapping[str, str] | None]]] = (
                collections.defaultdict(list)
            )
            for tenant, event in labelled:
                grouped[tenant].append((event, labels.get((tenant, event[0]))))
            for tenant, pairs in grouped.items():
                for stream in self._streams.get(tenant, ()):
                    if stream.filter.labels:
                        stream.offer(e for e, lab in pairs if stream.filter.labels_match(lab))

    def _expire(self) -> None:
        now = time.monotonic()
        for tenant in [t for t, expiry in self._remote.items() if expiry <= now]:
            del self._remote[tenant]

    def _end_tenant(self, tenant: str, error: ConveyorError) -> None:
        for stream in self._streams.get(tenant, ()):
            stream.end(error)

    def _end_all(self, error: ConveyorError) -> None:
        for streams in self._streams.values():
            for stream in streams:
                stream.end(error)


def _chunks(node: str, key: str, items: list[Any], **extra: str) -> Iterator[str]:
    """JSON payloads ``{"n": node, key: [...], **extra}``, each under MAX_NOTIFY_BYTES."""
    chunk: list[Any] = []
    size = 0
    for item in items:
        encoded = len(json.dumps(item)) + 1
        if chunk and size + encoded > MAX_NOTIFY_BYTES - 200:
            yield json.dumps({"n": node, key: chunk, **extra})
            chunk, size = [], 0
        chunk.append(item)
        size += encoded
    if chunk:
        yield json.dumps({"n": node, key: chunk, **extra})
