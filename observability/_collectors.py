"""Collectors that read state at scrape time: queue depth from the database, workers and
process state from memory.

Prometheus scrapes through the exposition server's threads, while the state lives on the
process's asyncio loop (the asyncpg pool, the session registry). :func:`call_on_loop`
runs a source on its loop from the scrape thread, with a timeout, so a scrape never
touches loop-owned objects from another thread and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "DEPTH_STATES",
    "QueueDepth",
    "QueueDepthCollector",
    "QueuePausedCollector",
    "Source",
    "WorkerPool",
    "WorkerPoolCollector",
    "WorkerProcessCollector",
    "WorkerProcessState",
    "call_on_loop",
    "prefetch_sources",
]

T = TypeVar("T")
Source = Callable[[], T | Awaitable[T]]

_log = logging.getLogger("conveyor.observability.metrics")

DEPTH_STATES = ("pending", "scheduled", "running", "dead")


def call_on_loop(source: Source[T], loop: asyncio.AbstractEventLoop | None, timeout: float) -> T:
    """Calls ``source`` (sync, or returning an awaitable) and returns its value.

    With a ``loop``, the call runs on that loop (from another thread) and is given up
    after ``timeout`` seconds; without one, a sync source is called right here.
    """
    if loop is None:
        value = source()
        if inspect.isawaitable(value):
            close = getattr(value, "close", None)
            if close is not None:
                close()  # never awaited: no "coroutine was never awaited" warning
            raise TypeError("an async metrics source needs the event loop it runs on (loop=)")
        return value
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError(
            "metrics were collected on the event loop their source runs on; collect from "
            "another thread (the exposition server does; in tests use asyncio.to_thread)"
        )

    async def run() -> T:
        value = source()
        if inspect.isawaitable(value):
            return await value
        return value

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


@dataclasses.dataclass(frozen=True, slots=True)
class QueueDepth:
    """Tasks of one (tenant, queue) by state, and the age of its oldest ready task."""

    tenant: str
    queue: str
    pending: int = 0
    scheduled: int = 0
    running: int = 0
    dead: int = 0
    #: Seconds since the oldest PENDING task became ready; None when nothing is pending.
    oldest_pending_age_seconds: float | None = None


class QueueDepthCollector(Collector):
    """``conveyor_queue_depth{tenant,queue,state}`` and
    ``conveyor_queue_oldest_pending_age_seconds{tenant,queue}``, read at scrape time.

    ``fetch`` runs one grouped query; its result is reused for ``max_age`` seconds, so
    several Prometheus servers (or a scrape storm) cost one query per ``max_age``. The
    query is exact, so it reads every unfinished task: with 10,000,000 waiting it took
    1.25 s and 2.4 s of PostgreSQL's CPU (issue 19, seventh round). So the result is
    also reused for ``COST_FACTOR`` times as long as the last fetch took (25 s at that
    depth), which keeps the query near 5 % of the time whatever the depth, and
    ``conveyor_queue_depth_age_seconds`` says how old the figures are. A fetch that fails
    or times out yields no depth series (an absent series, not a stale one: alerts on
    absence fire) and counts ``conveyor_queue_depth_errors_total``.
    """

    COST_FACTOR = 20.0

    def __init__(
        self,
        fetch: Source[Iterable[QueueDepth]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_age: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._loop = loop
        self._max_age = max_age
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._rows: list[QueueDepth] | None = None
        self._fetched_at = -float("inf")
        self._reuse_for = max_age
        self._errors = 0
        self.fetches = 0

    def describe(self) -> Iterable[Metric]:
        # Describing must not query the database (registration calls it).
        return list(self._families(None, 0.0))

    def collect(self) -> Iterator[Metric]:
        rows, age = self._current()
        yield from self._families(rows, age)

    def _current(self) -> tuple[list[QueueDepth] | None, float]:
        """The rows to export and their age in seconds."""
        with self._lock:
            now = self._clock()
            if self._rows is not None and now - self._fetched_at < self._reuse_for:
                return self._rows, now - self._fetched_at
            try:
                rows = list(call_on_loop(self._fetch, self._loop, self._timeout))
            except Exception as exc:
                self._errors += 1
                self._rows = None
                _log.warning("queue depth for metrics: the query failed: %r", exc)
                return None, 0.0
            self.fetches += 1
            self._rows = rows
            self._fetched_at = self._clock()
            took = self._fetched_at - now
            self._reuse_for = max(self._max_age, self.COST_FACTOR * took)
            return rows, 0.0

    def _families(self, rows: list[QueueDepth] | None, age: float) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "conveyor_queue_depth",
            "Tasks per queue by state (pending, scheduled, running, dead), read from the "
            "database at scrape time.",
            labels=("tenant", "queue", "state"),
        )
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_pending_age_seconds",
            "Seconds since the oldest pending (ready) task of the queue became ready; 0 when "
            "none is pending.",
            labels=("tenant", "queue"),
        )
        staleness = GaugeMetricFamily(
            "conveyor_queue_depth_age_seconds",
            "Seconds since the queue depth exported was read from the database: reused "
            "for at least 5 s, and for 20 times as long as the read took when the tables "
            "are deep.",
        )
        errors = CounterMetricFamily(
            "conveyor_queue_depth_errors",
            "Scrapes whose queue depth query failed or timed out.",
        )
        for row in rows or ():
            for state in DEPTH_STATES:
                depth.add_metric([row.tenant, row.queue, state], getattr(row, state))
            oldest.add_metric([row.tenant, row.queue], row.oldest_pending_age_seconds or 0.0)
        if rows is not None:
            staleness.add_metric([], age)
        errors.add_metric([], self._errors)
        yield depth
        yield oldest
        yield staleness
        yield errors


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerPool:
    """The workers connected to a leader, for one tenant."""

    tenant: str
    connected: int
    #: Free slots the workers granted that the coordinator has not used yet.
    credits: int
    #: Tasks leased to these workers without a result yet.
    in_flight: int
    #: Sessions assigned nothing for now: their event loop lags (coordinator/dispatch/health.py).
    unhealthy: int = 0


_UNREAD: Any = object()
PREFETCH_MAX_AGE = 1.0
"""Seconds a value read by :func:`prefetch_sources` may wait for its collector."""


class _SourceCollector(Collector, Generic[T]):
    def __init__(
        self, source: Source[T], loop: asyncio.AbstractEventLoop | None, timeout: float
    ) -> None:
        self._source = source
        self._loop = loop
        self._timeout = timeout
        self._prefetched: tuple[T | None, float] = (_UNREAD, 0.0)
        self._lock = threading.Lock()

    def _read(self) -> T | None:
        with self._lock:  # a value prefetched for this scrape is used once
            (value, at), self._prefetched = self._prefetched, (_UNREAD, 0.0)
        # Never an old one (a scrape that failed before collecting left it).
        if value is not _UNREAD and time.monotonic() - at < PREFETCH_MAX_AGE:
            return value
        try:
            return call_on_loop(self._source, self._loop, self._timeout)
        except Exception as exc:
            _log.warning("metrics source %r failed: %r", self._source, exc)
            return None


async def _read_all(group: list[_SourceCollector[Any]]) -> list[Any]:
    values: list[Any] = []
    for collector in group:
        try:
            value = collector._source()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            _log.warning("metrics source %r failed: %r", collector._source, exc)
            value = None
        values.append(value)
    return values


def prefetch_sources(collectors: Iterable[Collector]) -> None:
    """Reads every loop-bound source among ``collectors`` in one trip to its loop.

    Each source otherwise wakes the loop once per scrape (a coordinator has four: the
    workers, the pauses, the rate limits, the breakers), and every wake-up is a turn the
    loop that serves gRPC spends on a scrape. The values are handed to the collectors,
    each used by the next :meth:`collect` (the one of this scrape; never after
    :data:`PREFETCH_MAX_AGE`). A source that fails, or a trip that times out, yields
    nothing, as when read alone."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_SourceCollector[Any]]] = {}
    for collector in collectors:
        if isinstance(collector, _SourceCollector) and collector._loop is not None:
            by_loop.setdefault(collector._loop, []).append(collector)
    for loop, group in by_loop.items():
        values: list[Any]
        try:
            values = call_on_loop(partial(_read_all, group), loop, max(c._timeout for c in group))
        except TimeoutError:
            _log.warning("metrics sources timed out on their event loop")
            values = [None] * len(group)
        except Exception:
            continue  # (a scrape on the loop itself): each collector says why, alone
        at = time.monotonic()
        for collector, value in zip(group, values, strict=True):
            with collector._lock:
                collector._prefetched = (value, at)


class WorkerPoolCollector(_SourceCollector[Iterable[WorkerPool]]):
    """``conveyor_workers_connected``, ``conveyor_workers_credits``,
    ``conveyor_workers_in_flight_tasks`` and ``conveyor_worker_unhealthy`` per tenant, from
    the leader's session registry."""

    def describe(self) -> Iterable[Metric]:
        return list(self._families(()))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._read() or ())

    @staticmethod
    def _families(pools: Iterable[WorkerPool]) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "conveyor_workers_connected",
            "Worker processes connected to this coordinator (the leader has them all).",
            labels=("tenant",),
        )
        credits = GaugeMetricFamily(
            "conveyor_workers_credits",
            "Free slots the connected workers granted that are not used yet.",
            labels=("tenant",),
        )
        in_flight = GaugeMetricFamily(
            "conveyor_workers_in_flight_tasks",
            "Tasks leased to connected workers without a result yet (credits in use).",
            labels=("tenant",),
        )
        unhealthy = GaugeMetricFamily(
            "conveyor_worker_unhealthy",
            "Connected worker sessions assigned nothing for now because their event loop "
            "lags (see conveyor status).",
            labels=("tenant",),
        )
        for pool in pools:
            connected.add_metric([pool.tenant], pool.connected)
            credits.add_metric([pool.tenant], pool.credits)
            in_flight.add_metric([pool.tenant], pool.in_flight)
            unhealthy.add_metric([pool.tenant], pool.unhealthy)
        yield connected
        yield credits
        yield in_flight
        yield unhealthy


class QueuePausedCollector(_SourceCollector[Iterable[tuple[str, str]]]):
    """``conveyor_queue_paused`` per paused (tenant, queue), from the leader's pauses
    (a follower, which knows none, exports none)."""

    def describe(self) -> Iterable[Metric]:
        return list(self._families(()))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._read() or ())

    @staticmethod
    def _families(paused: Iterable[tuple[str, str]]) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "conveyor_queue_paused",
            "1 for each queue paused (PauseQueue): it accepts submits and dispatches nothing.",
            labels=("tenant", "queue"),
        )
        for tenant, queue in paused:
            family.add_metric([tenant, queue], 1)
        yield family


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerProcessState:
    """What one worker process is doing."""

    concurrency: int
    running: int
    connected: bool


class WorkerProcessCollector(_SourceCollector[WorkerProcessState]):
    """``conveyor_worker_concurrency``, ``conveyor_worker_running_tasks`` and
    ``conveyor_worker_connected`` of one worker process."""

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._read())

    @staticmethod
    def _families(state: WorkerProcessState | None) -> Iterator[Metric]:
        concurrency = GaugeMetricFamily(
            "conveyor_worker_concurrency", "Handler slots of this worker process."
        )
        running = GaugeMetricFamily(
            "conveyor_worker_running_tasks", "Handlers running in this worker process."
        )
        connected = GaugeMetricFamily(
            "conveyor_worker_connected",
            "1 while this worker process has a session with the leader, else 0.",
        )
        if state is not None:
            concurrency.add_metric([], state.concurrency)
            running.add_metric([], state.running)
            connected.add_metric([], 1.0 if state.connected else 0.0)
        yield concurrency
        yield running
        yield connected


class RateLimitCollector(_SourceCollector[Iterable[tuple[str, str, str, str, float]]]):
    """``conveyor_rate_limit_tokens`` per bucket, from the leader's rate limits
    (``coordinator/dispatch/rate_limits.py``): (scope, tenant, queue, type, tokens)."""

    def describe(self) -> Iterable[Metric]:
        return [self._family(())]

    def collect(self) -> Iterator[Metric]:
        yield self._family(self._read() or ())

    @staticmethod
    def _family(levels: Iterable[tuple[str, str, str, str, float]]) -> Metric:
        family = GaugeMetricFamily(
            "conveyor_rate_limit_tokens",
            "Tokens left in a rate limit's bucket on the leader (scope: tenant, or cluster "
            "for a limit across all tenants; queue or type empty: every one).",
            labels=("scope", "tenant", "queue", "type"),
        )
        for scope, tenant, queue, type_, tokens in levels:
            family.add_metric((scope, tenant, queue, type_), tokens)
        return family


class CircuitBreakerCollector(_SourceCollector[Iterable[tuple[str, str, int]]]):
    """``conveyor_circuit_breaker_state`` per (tenant, type), from the leader's breakers
    (``coordinator/dispatch/breakers.py``): (tenant, type, state)."""

    def describe(self) -> Iterable[Metric]:
        return [self._family(())]

    def collect(self) -> Iterator[Metric]:
        yield self._family(self._read() or ())

    @staticmethod
    def _family(states: Iterable[tuple[str, str, int]]) -> Metric:
        family = GaugeMetricFamily(
            "conveyor_circuit_breaker_state",
            "A task type's circuit breaker on the leader: 0 closed, 1 half-open, 2 open.",
            labels=("tenant", "type"),
        )
        for tenant, type_, state in states:
            family.add_metric((tenant, type_), state)
        return family
