"""The coordinator's telemetry: its metrics endpoint, its tracing, and what they read.

``server.py`` makes one :class:`Telemetry` per coordinator and hands its ``metrics`` and
``tracing`` to the services through :class:`~conveyor.coordinator.deps.Deps`:

- Metrics (:class:`~conveyor.observability.metrics.CoordinatorMetrics`) record only when
  ``metrics_listen`` is set; otherwise ``metrics`` is ``CoordinatorMetrics.off()``, whose
  methods do nothing, so a coordinator without an endpoint records nothing at all and no
  caller tests for it. Task state changes are counted by one after-commit listener
  (:meth:`Telemetry.on_transitions`, once per batch: a group commit, a claim, a sweep),
  registered only while metrics are recorded; group-commit sizes and refusals are
  recorded where they happen, once per flush. Queue depth and the connected workers are
  read at scrape time (:meth:`Telemetry.watch`); leadership comes from the office's
  events.
- Tracing (:class:`~conveyor.observability.tracing.Tracing`) is on when the ``OTEL_*``
  variables name an OTLP endpoint: a span per RPC through the gRPC server interceptor,
  and a ``dispatch`` span per leased attempt, whose context replaces the stored
  ``traceparent`` in the Assignment (:func:`dispatch_spans`), so the worker's
  ``execute`` span nests under it. Disabled, it costs one attribute test per claim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc.aio

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.lifecycle.transitions import (
    ID,
    QUEUE,
    TENANT,
    TYPE,
    AfterCommit,
    Cause,
    Transitions,
)
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import Database
from conveyor.observability.grpc_metrics import MetricsInterceptor
from conveyor.observability.metrics import (
    CoordinatorMetrics,
    MetricsServer,
    QueueDepth,
    WorkerPool,
)
from conveyor.observability.tracing import SERVICE_COORDINATOR, Tracing

if TYPE_CHECKING:
    from conveyor.coordinator.dispatch.policy import Packed
    from conveyor.coordinator.dispatch.sessions import SessionRegistry

__all__ = ["Telemetry", "dispatch_spans"]

_log = logging.getLogger("conveyor.coordinator.telemetry")

#: Seconds a queue depth read at scrape time is reused (several scrapers, one query).
DEPTH_MAX_AGE = 5.0
#: Longest a scrape waits for the database.
SCRAPE_TIMEOUT = 5.0


class Telemetry:
    """Metrics and tracing of one coordinator (see the module docstring).

    ``tracing`` defaults to what the ``OTEL_*`` environment asks for.
    """

    def __init__(
        self, config: CoordinatorConfig, *, node_id: str, tracing: Tracing | None = None
    ) -> None:
        self._listen = config.metrics_listen
        self.metrics = (
            CoordinatorMetrics(cluster=config.cluster)
            if self._listen
            else CoordinatorMetrics.off(cluster=config.cluster)
        )
        self.tracing = (
            tracing
            if tracing is not None
            else Tracing.from_env(SERVICE_COORDINATOR, instance_id=node_id)
        )
        self.server: MetricsServer | None = None

    @property
    def metrics_url(self) -> str:
        """Where the metrics are served ("" when they are not)."""
        return self.server.url if self.server is not None else ""

    def start(self) -> None:
        """Serves the metrics (a component of the coordinator: ``supervisor.py``)."""
        self.start_endpoint()

    async def stop(self) -> None:
        """Stops serving metrics, then exports the spans still buffered."""
        await self.stop_endpoint()
        await self.shutdown()

    def start_endpoint(self) -> None:
        """Binds the metrics endpoint (if any); raises OSError naming the address."""
        if self.metrics.enabled and self.server is None:
            server = MetricsServer(self.metrics.registry, self._listen)
            server.start()
            self.server = server
            _log.info("serving metrics on %s", server.url)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The telemetry's server interceptors, to go first in the chain: RPC timing
        (so it includes the interceptors after it), then a span per RPC."""
        timing: list[grpc.aio.ServerInterceptor] = (
            [MetricsInterceptor(self.metrics.rpc_duration)] if self.metrics.enabled else []
        )
        return [*timing, *self.tracing.server_interceptors()]

    def watch(self, db: Database, sessions: SessionRegistry, after_commit: AfterCommit) -> None:
        """Registers the scrape-time sources (queue depth, workers) on the running loop,
        and the listener that counts transitions."""
        if not self.metrics.enabled:
            return
        after_commit.listen(self.on_transitions)
        loop = asyncio.get_running_loop()

        async def depths() -> list[QueueDepth]:
            async with db.read() as conn:
                rows = await store.queue_depths(conn)
            return [QueueDepth(**row._asdict()) for row in rows]

        async def pools() -> list[WorkerPool]:
            return await worker_pools(db, sessions)

        self.metrics.watch_queue_depth(
            depths, loop=loop, max_age=DEPTH_MAX_AGE, timeout=SCRAPE_TIMEOUT
        )
        self.metrics.watch_workers(pools, loop=loop, timeout=SCRAPE_TIMEOUT)

    def on_transitions(self, batch: Transitions) -> None:
        """Counts one batch of committed transitions, by what caused it."""
        metrics, cause, rows = self.metrics, batch.cause, batch.rows
        if cause is Cause.SUBMITTED:
            metrics.count_submitted((r[TENANT], r[QUEUE], r[TYPE]) for r in rows)
        elif cause is Cause.CLAIMED:
            metrics.record_dispatched(rows)
        elif cause is Cause.HANDED_OFF:
            metrics.count_submitted((r[TENANT], r[QUEUE], r[TYPE]) for r in rows)
            metrics.record_dispatched(rows)
        elif cause is Cause.FINISHED:
            metrics.record_results(rows)
        elif cause in (Cause.EXPIRED, Cause.EVICTED, Cause.TAKEN_OVER):
            metrics.record_lease_expired(rows)
        elif cause is Cause.NOT_STARTED:
            metrics.record_requeued(rows)
        elif cause is Cause.CANCELLED:
            metrics.record_cancelled(rows)
        elif cause is Cause.RELEASED:
            # Dependents a dead or cancelled dependency cancelled (the rest became ready).
            metrics.record_cancelled(batch.finished())

    # -- shutdown ---------------------------------------------------------------------

    async def stop_endpoint(self) -> None:
        """Stops serving metrics (before the pool closes, so no scrape reads a closing one)."""
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.stop)

    async def shutdown(self) -> None:
        """Exports the spans still buffered and stops tracing."""
        await asyncio.to_thread(self.tracing.shutdown)


async def worker_pools(db: Database, sessions: SessionRegistry) -> list[WorkerPool]:
    """The connected workers per tenant: how many, their unused credit, and the leases they
    hold (one query over the tasks they run)."""
    live = [s for s in sessions if not s.closed]
    if not live:
        return []
    async with db.read() as conn:
        held = await store.running_per_worker(conn, [s.worker_id for s in live])
    totals: dict[str, list[int]] = {}
    for session in live:
        entry = totals.setdefault(session.tenant, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += session.credit
        entry[2] += held.get((session.tenant, session.worker_id), 0)
        entry[3] += bool(session.unhealthy)
    return [WorkerPool(tenant, *entry) for tenant, entry in sorted(totals.items())]


def dispatch_spans(
    tracing: Tracing, rows: Sequence[Any], messages: Sequence[Packed], start_ns: int
) -> None:
    """One ``dispatch`` span per leased row (a transition with ``traceparent``), started at
    ``start_ns`` (the claim's start); each span's context becomes the ``traceparent`` of the
    Assignment with the row's task id in ``messages``."""
    traceparents = tracing.dispatch_spans(rows, start_time_ns=start_ns)
    by_id = {row[ID]: traceparent for row, traceparent in zip(rows, traceparents, strict=True)}
    for packed in messages:
        for assignment in packed.message.assignments.assignments:
            assignment.traceparent = by_id[assignment.lease.task_id]
