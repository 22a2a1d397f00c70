"""Task-type definitions: cached on every coordinator, dropped everywhere at a change, and
applied to the submits that leave a field unset.

The cache (:class:`TaskTypes`) is cache-aside: warmed with every definition at start,
an entry dropped when PostgreSQL tells of a change (LISTEN on ``conveyor_task_types``:
the change's own transaction sends the NOTIFY), read again on the next lookup that
misses. A submit's lookup is per call, not per task: a tenant without definitions costs
one set lookup, and the others one dict lookup per distinct type of the call.

No submit uses a definition older than a change acknowledged before it: a change's
caller (``api/task_type_service.py``) answers only once every coordinator's cache
connection says it holds the change's version (its ``application_name``, set after the
entry was dropped), ending within :data:`ACK_TIMEOUT` the connections that do not, and a
coordinator trusts its cache only while that connection lives and answered within
:data:`FRESH_FOR` (else it reads the store on every lookup). So a paused or partitioned
coordinator cannot serve a stale definition after the change's caller was answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from conveyor.coordinator.config import DEFAULT_QUEUE
from conveyor.coordinator.store import task_types as store
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.store.listener import listening, reconnecting
from conveyor.coordinator.store.task_types import Definition
from conveyor.coordinator.supervisor import stop_task
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.v1 import task_service_pb2

_log = logging.getLogger("conveyor.coordinator.task_types")

PING_INTERVAL = 0.25
FRESH_FOR = 1.0
"""Seconds the cache is trusted after its connection last answered."""
ACK_TIMEOUT = 1.0
"""Seconds a change's caller waits for every cache to hold it before ending the
connections of those that do not."""
DELAYS_KEPT = 1000
START_TIMEOUT = 5.0
"""The longest start waits for the cache to be warm (the API serves either way: lookups
read the store until it is)."""

Key = tuple[str, str]
_UNSET_QUEUES = ("", DEFAULT_QUEUE)


class TaskTypes:
    """The definitions cache of this coordinator (see the module docstring)."""

    def __init__(self, db: Database, dsn: str, metrics: CoordinatorMetrics) -> None:
        self._db = db
        self._dsn = dsn
        self._entries: dict[Key, Definition | None] = {}
        """Cached definitions; None: known to have none."""
        self._tenants: set[str] = set()
        """Tenants that have (or had, since the cache was warmed) definitions."""
        self._generation = 0
        self._synced = False
        self._fresh_until = 0.0
        self._announced = 0
        self.version = 0
        """The version of the definitions the cache holds."""
        self.hits = 0
        self.misses = 0
        self.delays: collections.deque[float] = collections.deque(maxlen=DELAYS_KEPT)
        """Seconds from each change (its statement, by the database's clock) to its entry
        being dropped here (this machine's clock)."""
        self._dirty = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lookups: Any = None
        self._delay_seconds: Any = None
        if metrics.enabled:
            self._lookups = Counter(
                "conveyor_task_type_cache_lookups",
                "Task-type definition lookups of submits, by result (hit, miss).",
                ["result"],
                registry=metrics.registry,
            )
            self._delay_seconds = Histogram(
                "conveyor_task_type_invalidation_seconds",
                "From a task-type change to its cache entry dropped on this coordinator.",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                registry=metrics.registry,
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts listening and warms the cache (waits for it, briefly)."""
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="task-types")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_TIMEOUT):
                await self._ready.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def usable(self) -> bool:
        """Whether the cache may be trusted now (see the module docstring)."""
        return self._synced and time.monotonic() < self._fresh_until

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(self, tenant: str, types: Iterable[str]) -> dict[str, Definition]:
        """The definitions of ``types`` for ``tenant`` (those that have one)."""
        usable = self.usable()
        if usable and tenant not in self._tenants:
            return {}
        wanted = set(types)
        found: dict[str, Definition] = {}
        missing: list[str] = []
        if usable:
            for type_ in wanted:
                key = (tenant, type_)
                if key in self._entries:
                    entry = self._entries[key]
                    if entry is not None:
                        found[type_] = entry
                else:
                    missing.append(type_)
        else:
            missing = sorted(wanted)
        self._count(len(wanted) - len(missing), len(missing))
        if missing:
            generation = self._generation
            async with self._db.read() as conn:
                rows = await store.get_many(conn, tenant, missing)
            read = {r["type"]: store.definition(r) for r in rows}
            found.update(read)
            # Keep what was read unless a change arrived meanwhile (it may be older).
            if usable and self._synced and generation == self._generation:
                for type_ in missing:
                    self._entries[(tenant, type_)] = read.get(type_)
        return found

    def _count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        if self._lookups is not None:
            if hits:
                self._lookups.labels("hit").inc(hits)
            if misses:
                self._lookups.labels("miss").inc(misses)

    async def apply(
        self, tenant: str, requests: Sequence[task_service_pb2.SubmitTaskRequest]
    ) -> None:
        """Fills the fields each request left unset from its type's definition."""
        if self.usable() and tenant not in self._tenants:
            return
        definitions = await self.lookup(tenant, {r.type for r in requests})
        if definitions:
            for request in requests:
                d = definitions.get(request.type)
                if d is not None:
                    fill(request, d)

    # -- the listener ----------------------------------------------------------------------

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            version_text, at, tenant, type_ = str(payload).split(" ", 3)
            version = int(version_text)
            delay = max(0.0, time.time() - float(at))
        except ValueError:
            _log.warning("ignored a malformed task-type notification %r", payload)
            return
        self._entries.pop((tenant, type_), None)
        self._tenants.add(tenant)
        self._generation += 1
        self.version = max(self.version, version)
        self.delays.append(delay)
        if self._delay_seconds is not None:
            self._delay_seconds.observe(delay)
        self._dirty.set()

    async def _listen(self) -> None:
        await reconnecting(self._session, "the task-type cache", after=self._lost)

    def _lost(self) -> None:
        self._synced = False
        self._dirty.set()

    async def _session(self) -> None:
        # Named "conveyor-types-loading" until loaded, not "conveyor-types v...": a change's
        # caller does not wait for a cache still loading (it reads what the change wrote).
        channels = {store.NOTIFY_CHANNEL: self._notified}
        async with listening(self._dsn, "conveyor-types-loading", channels, on_lost=self._lost) as (
            conn,
            lost,
        ):
            try:
                # Listening from here on: what the load reads, and every change after it.
                rows, version = await store.load_all(conn)
                self._entries = {(r["tenant"], r["type"]): store.definition(r) for r in rows}
                self._tenants = {r["tenant"] for r in rows}
                self._generation += 1
                self.version = max(self.version, version)
                await self._announce(conn)
                self._synced = True
                self._ready.set()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PING_INTERVAL):
                            await self._dirty.wait()
                    self._dirty.clear()
                    if lost.is_set():
                        break
                    if self.version != self._announced:
                        await self._announce(conn)
                    else:
                        await conn.fetchval("SELECT 1", timeout=FRESH_FOR)
                        self._fresh_until = time.monotonic() + FRESH_FOR
            finally:
                self._synced = False

    async def _announce(self, conn: asyncpg.Connection) -> None:
        version = self.version
        await store.announce(conn, version)
        self._announced = version
        self._fresh_until = time.monotonic() + FRESH_FOR


async def wait_for_caches(db: Database, version: int) -> None:
    """Returns once every coordinator's cache holds ``version``; ends (within
    ACK_TIMEOUT) the cache connections that do not (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ACK_TIMEOUT
    async with db.read() as conn:
        while True:
            stale = [r["pid"] for r in await store.cache_versions(conn) if r["version"] < version]
            if not stale:
                return
            if loop.time() >= deadline:
                _log.warning(
                    "%d task-type caches did not take version %d within %.1fs: ending their "
                    "connections (they read the store until they reconnect)",
                    len(stale),
                    version,
                    ACK_TIMEOUT,
                )
                await store.terminate_stale(conn, stale)
                return
            await asyncio.sleep(0.005)


def fill(request: task_service_pb2.SubmitTaskRequest, d: Definition) -> None:
    """Sets the fields ``request`` left unset to ``d``'s (where ``d`` sets them). The queue
    ``default`` counts as unset: the SDKs and the CLI send it when the caller names none."""
    if request.queue in _UNSET_QUEUES and d.queue is not None:
        request.queue = d.queue
    if not request.priority and d.priority is not None:
        request.priority = d.priority
    if not request.max_attempts and d.max_attempts is not None:
        request.max_attempts = d.max_attempts
    if not request.HasField("timeout") and d.timeout_ms is not None:
        request.timeout.FromMilliseconds(d.timeout_ms)
    if not request.HasField("retry_policy") and d.retry_initial_ms is not None:
        policy = request.retry_policy
        policy.initial_backoff.FromMilliseconds(d.retry_initial_ms)
        if d.retry_max_ms is not None:
            policy.max_backoff.FromMilliseconds(d.retry_max_ms)
        policy.multiplier = d.retry_multiplier or 0.0
        policy.jitter = d.retry_jitter or 0.0
