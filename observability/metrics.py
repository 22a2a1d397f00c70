"""Every Prometheus metric Conveyor exports, defined once, grouped per process.

:class:`CoordinatorMetrics` and :class:`WorkerMetrics` each own a private
:class:`~prometheus_client.CollectorRegistry` (never the global default one), so tests and
several coordinators in one process do not collide. Names follow Prometheus conventions:
the ``conveyor_`` prefix, ``_total`` counters, base units (seconds, bytes). Task metrics
are labelled ``tenant``, ``queue`` and ``type`` (``tenant`` is ``default`` until tenants
exist, so dashboards and alerts already aggregate by it).

On the hot path nothing is recorded per task: the ``record_*`` methods take the rows of
a whole batch (a group commit, a claim round, a results message), group them by labels and
add each group once (one ``inc(n)`` per group, one lock per histogram). Rows are anything
indexable by column name (asyncpg records, dicts); the columns each method reads are in
its docstring. State numbers are the ``conveyor.v1.TaskState`` values stored in the
``tasks`` table.

Queue depth and the workers' gauges are read at scrape time through collectors
(:meth:`CoordinatorMetrics.watch_queue_depth`, :meth:`CoordinatorMetrics.watch_workers`,
:meth:`WorkerMetrics.watch_process`), so they cost nothing between scrapes.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from operator import itemgetter
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from conveyor.observability._collectors import (
    DEPTH_STATES,
    CircuitBreakerCollector,
    QueueDepth,
    QueueDepthCollector,
    QueuePausedCollector,
    RateLimitCollector,
    Source,
    WorkerPool,
    WorkerPoolCollector,
    WorkerProcessCollector,
    WorkerProcessState,
    call_on_loop,
)
from conveyor.observability._histogram import BatchHistogram
from conveyor.observability._server import MetricsServer, parse_listen

__all__ = [
    "DEFAULT_TENANT",
    "DEPTH_STATES",
    "EVICTION_REASONS",
    "LATENCY_BUCKETS",
    "TASK_LABELS",
    "BatchHistogram",
    "CoordinatorMetrics",
    "MetricsServer",
    "QueueDepth",
    "Row",
    "WorkerMetrics",
    "WorkerPool",
    "WorkerProcessState",
    "call_on_loop",
    "metric_names",
    "parse_listen",
    "sample_names",
]

DEFAULT_TENANT = "default"
TASK_LABELS = ("tenant", "queue", "type")

# conveyor.v1.TaskState numbers, as the tasks table stores them.
PENDING, SCHEDULED, RUNNING, SUCCEEDED, DEAD, CANCELLED = 1, 2, 3, 4, 5, 6

#: Seconds, from a few milliseconds (pickup latency at light load) to an hour (a backlog).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Items per group commit: 1 at light load up to the coordinator's max_batch.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
#: Seconds per flush transaction.
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

#: Seconds a worker's event loop ran late: a healthy loop stays in the milliseconds.
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Values of ``conveyor_worker_evictions_total``'s ``reason`` label (a bounded set: the
#: eviction message itself goes to the log and GetClusterStatus).
EVICTION_REASONS = ("silent", "not_reading", "replaced")


class Row(Protocol):
    """A batch row: anything indexable by column name (asyncpg.Record, dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


def _version() -> str:
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:
        return "unknown"


def _registry(process_metrics: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        # process_* (CPU, memory, open files), python_info and python_gc_*: the standard
        # series every Python exporter has, here on this process's own registry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class _Children:
    """A labelled counter's children by label values: ``Counter.labels()`` validates and
    locks on every call, which would cost more than the counting itself per group.

    Used from the process's event loop thread only (the recorders run there).
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Counter] = {}

    def inc(self, labels: tuple[str, ...], n: float) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        child.inc(n)

    def add(self, tally: Tally[tuple[str, ...]]) -> None:
        for labels, n in tally.items():
            self.inc(labels, n)


# (tenant, queue, type) of a row in one C call.
_labels: Callable[[Row], tuple[str, str, str]] = itemgetter(*TASK_LABELS)


class CoordinatorMetrics:
    """The coordinator's metrics, on :attr:`registry`.

    ``cluster`` labels the leadership series, so one Prometheus can watch several
    clusters and "no leader" is decided per cluster. A coordinator that exports no metrics
    holds :meth:`off` instead, so nothing is recorded and no caller tests for None.
    """

    enabled = True
    """False for :meth:`off`: no registry, and every method does nothing."""

    @classmethod
    def off(cls, *, cluster: str = "default") -> CoordinatorMetrics:
        """Metrics that record nothing, at no cost: every method is a no-op."""
        return _Off(cluster)

    def __init__(self, *, cluster: str = "default", process_metrics: bool = True) -> None:
        self.cluster = cluster
        self.registry = r = _registry(process_metrics)
        Info("conveyor_build", "The Conveyor version this process runs.", registry=r).info(
            {"version": _version(), "component": "coordinator"}
        )

        # -- task lifecycle counters ----------------------------------------------------
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, TASK_LABELS, registry=r)

        self.submitted = counter(
            "conveyor_tasks_submitted_total", "Tasks accepted (committed) by a submit."
        )
        self.dispatched = counter(
            "conveyor_tasks_dispatched_total", "Attempts leased to a worker (claims)."
        )
        self.succeeded = counter("conveyor_tasks_succeeded_total", "Tasks that succeeded.")
        self.failed = counter(
            "conveyor_tasks_failed_total",
            "Attempts that failed or timed out (each retry's failure counts again).",
        )
        self.retried = counter(
            "conveyor_tasks_retried_total",
            "Failed attempts after which the task was scheduled for another attempt.",
        )
        self.dead_lettered = counter(
            "conveyor_tasks_dead_lettered_total",
            "Tasks moved to the dead-letter queue (attempts exhausted or non-retryable).",
        )
        self.cancelled = counter("conveyor_tasks_cancelled_total", "Tasks cancelled.")
        self.lease_expired = counter(
            "conveyor_tasks_lease_expired_total",
            "Attempts whose lease expired (worker died or went silent).",
        )
        self.requeued = counter(
            "conveyor_tasks_requeued_total",
            "Attempts given back without counting (never started, or interrupted by a "
            "worker's shutdown).",
        )
        self.results_refused = Counter(
            "conveyor_results_refused_total",
            "Results and heartbeats refused because their lease was not current.",
            registry=r,
        )

        self._submitted = _Children(self.submitted)
        self._dispatched = _Children(self.dispatched)
        self._succeeded = _Children(self.succeeded)
        self._failed = _Children(self.failed)
        self._retried = _Children(self.retried)
        self._dead_lettered = _Children(self.dead_lettered)
        self._cancelled = _Children(self.cancelled)
        self._lease_expired = _Children(self.lease_expired)
        self._requeued = _Children(self.requeued)

        # -- task latency histograms ----------------------------------------------------
        def latency(name: str, doc: str) -> BatchHistogram:
            return BatchHistogram(name, doc, TASK_LABELS, buckets=LATENCY_BUCKETS, registry=r)

        self.queue_wait = latency(
            "conveyor_task_queue_wait_seconds",
            "From ready (run_at reached) to leased to a worker, per attempt.",
        )
        self.pickup_latency = latency(
            "conveyor_task_pickup_latency_seconds",
            "From submit to the first lease, for tasks submitted ready to run.",
        )
        self.run_time = latency(
            "conveyor_task_run_seconds", "From lease start to the result, per attempt."
        )
        self.end_to_end = latency(
            "conveyor_task_end_to_end_seconds",
            "From submit to the final result (succeeded or dead-lettered).",
        )

        # -- group commit and RPCs ------------------------------------------------------
        # BatchHistograms: observed per flush like a Histogram, but collected at a
        # quarter of its cost at every scrape (no per-series child objects, no _created).
        self.batch_items = BatchHistogram(
            "conveyor_group_commit_items",
            "Items per group-commit transaction, by kind (submit, result, renewal, claim).",
            ("kind",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.flush_time = BatchHistogram(
            "conveyor_group_commit_flush_seconds",
            "Duration of one group-commit transaction, by kind.",
            ("kind",),
            buckets=FLUSH_BUCKETS,
            registry=r,
        )
        # A BatchHistogram, though observed one call at a time: it renders its own text
        # at a scrape, the largest family of the page (about 17 lines per method and
        # code), and observes under one lock without prometheus_client's bucket walk.
        self.rpc_duration = BatchHistogram(
            "conveyor_rpc_duration_seconds",
            "gRPC calls served, by service, method and status code (streams: their life).",
            ("service", "method", "code"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # -- workers ----------------------------------------------------------------------
        self.worker_sessions = Counter(
            "conveyor_worker_sessions_total",
            "Worker streams accepted (connects and reconnects).",
            ("tenant",),
            registry=r,
        )
        self.worker_evictions = Counter(
            "conveyor_worker_evictions_total",
            "Workers cut off by the coordinator, by reason (silent, not_reading, replaced).",
            ("reason",),
            registry=r,
        )
        self.worker_loop_lag = BatchHistogram(
            "conveyor_worker_loop_lag_seconds",
            "Event-loop lag workers report, one observation per heartbeat (the most their "
            "loop ran late since the previous one).",
            (),
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )

        # -- leadership -------------------------------------------------------------------
        self.leader = Gauge(
            "conveyor_leader",
            "1 while this coordinator leads its cluster, else 0.",
            ("cluster",),
            registry=r,
        )
        self.epoch = Gauge(
            "conveyor_leader_epoch",
            "The epoch this coordinator last led with (the fencing token).",
            ("cluster",),
            registry=r,
        )
        self.terms = Counter(
            "conveyor_leader_terms_total",
            "Terms this coordinator began (elections won and taken office).",
            ("cluster",),
            registry=r,
        )
        self.fenced_writes = Counter(
            "conveyor_fenced_writes_total",
            "Dispatch-side writes the fence refused because a newer epoch exists.",
            ("cluster",),
            registry=r,
        )
        self.etcd_session = Gauge(
            "conveyor_etcd_session_up",
            "1 while this coordinator holds a live etcd session (lease), else 0.",
            ("cluster",),
            registry=r,
        )
        self.leader.labels(cluster).set(0)
        self.epoch.labels(cluster).set(0)
        self.terms.labels(cluster)
        self.fenced_writes.labels(cluster)

        # -- schedules --------------------------------------------------------------------
        self.schedule_firings = Counter(
            "conveyor_schedule_firings_total",
            "Tasks submitted by cron schedules.",
            ("tenant",),
            registry=r,
        )
        self.schedule_lag = BatchHistogram(
            "conveyor_schedule_firing_lag_seconds",
            "From a schedule's tick to the commit of its task.",
            ("tenant",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_ticks_refused = Counter(
            "conveyor_schedule_ticks_refused",
            "Schedule ticks that submitted no task because the tenant was over a limit "
            "(max_backlog, submit_rate): a firing is a submit.",
            ("tenant", "limit"),
            registry=r,
        )

        # -- flow control at dispatch (coordinator/dispatch/rate_limits.py) ----------------
        self.dispatch_holds = Counter(
            "conveyor_dispatch_holds_total",
            "Claims (rounds, not tasks) a dispatch rule held back, by the rule's tenant, "
            "queue and type ('' for every one, '*' tenant: every tenant) and reason "
            "(rate_limit: the bucket had no whole token left after the claim).",
            ("tenant", "queue", "type", "reason"),
            registry=r,
        )

        self._deadline_exceeded = _Children(
            counter(
                "conveyor_tasks_deadline_exceeded_total",
                "Tasks whose deadline passed before an attempt started (made DEAD).",
            )
        )

        # -- loops that serve every tenant ------------------------------------------------
        self.rows_set_aside = Counter(
            "conveyor_rows_set_aside",
            "Rows a loop serving every tenant could not use and set aside (skipped and "
            "marked, said once in the log), by loop: schedule-firer, promoter, reaper, "
            "dispatcher, directory.",
            ("loop",),
            registry=r,
        )

        # -- queue operations -------------------------------------------------------------
        self.purged = Counter(
            "conveyor_tasks_purged_total",
            "Finished tasks deleted, by reason: retention (older than the coordinator's "
            "retention_days) or purge (DeleteTasks).",
            ("tenant", "reason"),
            registry=r,
        )

    # -- batch recorders: called once per batch on the hot path --------------------------

    def count_submitted(self, labels: Iterable[tuple[str, str, str]]) -> None:
        """Tasks of one committed submit batch, as (tenant, queue, type) tuples.

        Deduplicated submits (an idempotency key seen before) are not new tasks: leave
        them out.
        """
        self._submitted.add(Tally(labels))

    def record_dispatched(self, rows: Iterable[Row]) -> None:
        """Attempts leased in one claim round.

        Columns: tenant, queue, type; ``queue_wait_seconds`` (now minus the moment the
        task became ready); ``pickup_seconds`` (now minus the submit, only for a first
        attempt of a task submitted ready to run; else None). Compute both in the claim's
        SQL, with the database clock, so no clock skew and no Python date arithmetic per
        row.
        """
        tally: Tally[tuple[str, ...]] = Tally()
        waits: list[tuple[tuple[str, ...], float]] = []
        pickups: list[tuple[tuple[str, ...], float]] = []
        for row in rows:
            labels = _labels(row)
            tally[labels] += 1
            wait = row["queue_wait_seconds"]
            if wait is not None:
                waits.append((labels, wait))
            pickup = row["pickup_seconds"]
            if pickup is not None:
                pickups.append((labels, pickup))
        self._dispatched.add(tally)
        self.queue_wait.observe_pairs(waits)
        self.pickup_latency.observe_pairs(pickups)

    def record_results(self, rows: Iterable[Row]) -> None:
        """Results applied by one result flush.

        Columns: tenant, queue, type; ``state`` (the task's state after the result:
        SUCCEEDED, SCHEDULED for a retry, DEAD, or PENDING when the attempt was given
        back); ``run_seconds`` (lease start to now, or None); ``end_to_end_seconds``
        (create time to now when the task reached SUCCEEDED or DEAD, else None).
        """
        tally: Tally[tuple[tuple[str, ...], int]] = Tally()
        runs: list[tuple[tuple[str, ...], float]] = []
        ends: list[tuple[tuple[str, ...], float]] = []
        for row in rows:
            labels = _labels(row)
            tally[labels, row["state"]] += 1
            run = row["run_seconds"]
            if run is not None:
                runs.append((labels, run))
            end = row["end_to_end_seconds"]
            if end is not None:
                ends.append((labels, end))
        for (group, state), n in tally.items():
            if state == SUCCEEDED:
                self._succeeded.inc(group, n)
            elif state == PENDING:
                self._requeued.inc(group, n)
            elif state == CANCELLED:
                self._cancelled.inc(group, n)
            else:
                self._failed.inc(group, n)
                if state == SCHEDULED:
                    self._retried.inc(group, n)
                elif state == DEAD:
                    self._dead_lettered.inc(group, n)
        self.run_time.observe_pairs(runs)
        self.end_to_end.observe_pairs(ends)

    def record_lease_expired(self, rows: Iterable[Row]) -> None:
        """Leases the reaper took back (columns tenant, queue, type, ``state`` after it:
        PENDING to run again, DEAD when it was the last attempt)."""
        expired: Tally[tuple[str, ...]] = Tally()
        dead: Tally[tuple[str, ...]] = Tally()
        for row in rows:
            labels = _labels(row)
            expired[labels] += 1
            if row["state"] == DEAD:
                dead[labels] += 1
        self._lease_expired.add(expired)
        self._dead_lettered.add(dead)

    def record_cancelled(self, rows: Iterable[Row]) -> None:
        """Tasks a cancel moved to CANCELLED (columns tenant, queue, type)."""
        self._cancelled.add(Tally(map(_labels, rows)))

    def record_requeued(self, rows: Iterable[Row]) -> None:
        """Attempts given back without counting outside a result (claimed but never
        delivered; columns tenant, queue, type)."""
        self._requeued.add(Tally(map(_labels, rows)))

    def record_firing_lags(self, lags: Iterable[tuple[str, float]]) -> None:
        """Schedule firings committed in one firer round, as (tenant, lag seconds) pairs
        (the lag: commit time minus tick time)."""
        pairs = [((tenant,), lag) for tenant, lag in lags]
        for (tenant,), n in Tally(labels for labels, _ in pairs).items():
            self.schedule_firings.labels(tenant).inc(n)
        self.schedule_lag.observe_pairs(pairs)

    def count_refused_ticks(self, tally: Mapping[tuple[str, str], int]) -> None:
        """Schedule ticks refused in one firer transaction, by (tenant, limit)."""
        for (tenant, limit), n in tally.items():
            self.schedule_ticks_refused.labels(tenant, limit).inc(n)

    def count_set_aside(self, loop: str, count: int) -> None:
        """Rows the loop ``loop`` set aside (each once)."""
        if count:
            self.rows_set_aside.labels(loop).inc(count)

    def record_deadline_exceeded(self, rows: Iterable[Row]) -> None:
        """Tasks the deadline sweep made DEAD (columns tenant, queue, type)."""
        self._deadline_exceeded.add(Tally(map(_labels, rows)))

    def count_holds(self, tally: Mapping[tuple[str, str, str], int], reason: str) -> None:
        """Claims held back since the last call, per rule (tenant, queue, type)."""
        for (tenant, queue, type_), n in tally.items():
            self.dispatch_holds.labels(tenant, queue, type_, reason).inc(n)

    def count_purged(self, per_tenant: Mapping[str, int], reason: str) -> None:
        """Finished tasks deleted in one statement, per tenant (reason: retention, purge)."""
        for tenant, n in per_tenant.items():
            if n:
                self.purged.labels(tenant, reason).inc(n)

    def record_flush(self, kind: str, items: int, seconds: float) -> None:
        """One group-commit transaction of ``kind`` (submit, result, renewal, claim)."""
        self.batch_items.observe((kind,), items)
        self.flush_time.observe((kind,), seconds)

    def record_refused(self, count: int) -> None:
        """Results or lease renewals of one flush refused as not current."""
        if count:
            self.results_refused.inc(count)

    # -- workers (once per stream) -------------------------------------------------------

    def worker_connected(self, tenant: str) -> None:
        """A worker stream was accepted (a connect or a reconnect)."""
        self.worker_sessions.labels(tenant).inc()

    def record_loop_lag(self, seconds: float) -> None:
        """One worker heartbeat's event-loop lag."""
        self.worker_loop_lag.observe((), seconds)

    def worker_evicted(self, reason: str) -> None:
        """The coordinator cut a worker off; ``reason`` is one of :data:`EVICTION_REASONS`."""
        if reason not in EVICTION_REASONS:
            raise ValueError(f"eviction reason {reason!r} is not one of {EVICTION_REASONS}")
        self.worker_evictions.labels(reason).inc()

    # -- leadership (rare events) ------------------------------------------------------

    def took_office(self, epoch: int) -> None:
        """This coordinator began a term with ``epoch``."""
        self.leader.labels(self.cluster).set(1)
        self.epoch.labels(self.cluster).set(epoch)
        self.terms.labels(self.cluster).inc()

    def left_office(self) -> None:
        """This coordinator no longer leads (deposed, fenced or stopping)."""
        self.leader.labels(self.cluster).set(0)

    def fenced(self) -> None:
        """The fence refused one of this coordinator's writes (a newer epoch exists)."""
        self.fenced_writes.labels(self.cluster).inc()

    def etcd_session_changed(self, up: bool) -> None:
        """This coordinator's etcd session (its lease) came up or went down."""
        self.etcd_session.labels(self.cluster).set(1 if up else 0)

    # -- read at scrape time -----------------------------------------------------------

    def watch_queue_depth(
        self,
        fetch: Source[Iterable[QueueDepth]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_age: float = 5.0,
        timeout: float = 5.0,
    ) -> QueueDepthCollector:
        """Exports queue depth read by ``fetch`` (sync, or async on ``loop``) at scrape
        time, at most once per ``max_age`` seconds."""
        collector = QueueDepthCollector(fetch, loop=loop, max_age=max_age, timeout=timeout)
        self.registry.register(collector)
        return collector

    def watch_queue_pauses(
        self,
        source: Source[Iterable[tuple[str, str]]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> None:
        """Exports ``conveyor_queue_paused`` (1 per paused queue) from ``source``, the
        leader's paused (tenant, queue) pairs, run on ``loop`` when given."""
        self.registry.register(QueuePausedCollector(source, loop, timeout))

    def watch_workers(
        self,
        source: Source[Iterable[WorkerPool]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> WorkerPoolCollector:
        """Exports the connected workers, their credits and in-flight tasks, read from
        ``source`` (run on ``loop`` when given) at scrape time."""
        collector = WorkerPoolCollector(source, loop, timeout)
        self.registry.register(collector)
        return collector

    def watch_rate_limits(
        self,
        source: Source[Iterable[tuple[str, str, str, str, float]]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> RateLimitCollector:
        """Exports the rate limits' tokens, read from ``source`` (run on ``loop`` when
        given) at scrape time."""
        collector = RateLimitCollector(source, loop, timeout)
        self.registry.register(collector)
        return collector

    def watch_circuit_breakers(
        self,
        source: Source[Iterable[tuple[str, str, int]]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> CircuitBreakerCollector:
        """Exports the circuit breakers' states, read from ``source`` (run on ``loop``
        when given) at scrape time."""
        collector = CircuitBreakerCollector(source, loop, timeout)
        self.registry.register(collector)
        return collector


class _Off(CoordinatorMetrics):
    """:meth:`CoordinatorMetrics.off`: its public methods are replaced below by no-ops, so
    a recorder added to CoordinatorMetrics is a no-op here without a line more."""

    enabled = False

    def __init__(self, cluster: str) -> None:  # builds no registry and no metric
        self.cluster = cluster


def _ignore(*args: object, **kwargs: object) -> None:
    return None


for _name, _member in vars(CoordinatorMetrics).items():
    if callable(_member) and not _name.startswith("_"):
        setattr(_Off, _name, staticmethod(_ignore))


class WorkerMetrics:
    """A worker process's metrics, on :attr:`registry`."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = r = _registry(process_metrics)
        Info("conveyor_build", "The Conveyor version this process runs.", registry=r).info(
            {"version": _version(), "component": "worker"}
        )
        self.executions = Counter(
            "conveyor_worker_executions_total",
            "Handler runs finished in this process, by queue, type and outcome "
            "(succeeded, failed, timed_out, cancelled, interrupted, lost).",
            ("queue", "type", "outcome"),
            registry=r,
        )
        self.execution_time = BatchHistogram(
            "conveyor_worker_execution_seconds",
            "Handler run time in this process, by queue, type and outcome.",
            ("queue", "type", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reconnects = Counter(
            "conveyor_worker_reconnects_total",
            "Sessions this process opened again after losing one.",
            registry=r,
        )
        self._executions = _Children(self.executions)

    def record_executions(self, runs: Iterable[tuple[str, str, str, float]]) -> None:
        """Handler runs of one results message: (queue, type, outcome, seconds) each.

        Outcomes: ``succeeded``, ``failed``, ``timed_out``, ``cancelled``,
        ``interrupted`` (stopped by the worker's shutdown) and ``lost`` (stopped because
        the coordinator took the lease back; no result is sent for those).
        """
        pairs = [((queue, type_, outcome), seconds) for queue, type_, outcome, seconds in runs]
        self._executions.add(Tally(labels for labels, _ in pairs))
        self.execution_time.observe_pairs(pairs)

    def watch_process(
        self,
        source: Source[WorkerProcessState],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> WorkerProcessCollector:
        """Exports concurrency, running handlers and connection state read from
        ``source`` (run on ``loop`` when given) at scrape time."""
        collector = WorkerProcessCollector(source, loop, timeout)
        self.registry.register(collector)
        return collector


def metric_names(registry: CollectorRegistry) -> set[str]:
    """The metric family names a registry exports (``conveyor_tasks_submitted``, not
    ``..._total``), for checks that dashboards and alerts query only what exists."""
    return {family.name for family in registry.collect()}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can export (``_total``, ``_bucket``, ``_count``, ...).

    Families without samples yet (labelled metrics nobody recorded) get the suffixes
    their type implies, so the set does not depend on what happened before the call.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("", "_count", "_sum", "_created"),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
