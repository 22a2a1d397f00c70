"""What ``conveyor top`` shows, as pure functions: data in, a rich renderable out.

The command (in the CLI) fetches, every second, ``AdminService.GetClusterStatus``, the
queues (``TaskService.ListQueues``) and, when it can reach one, a coordinator's metrics
endpoint for throughput; it turns them into a :class:`Snapshot` with
:func:`snapshot_from_protos`, computes rates between two scrapes with :func:`rates` over
:func:`totals_from_metrics`, and shows :func:`render` in a ``rich.live.Live``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from conveyor.v1 import admin_service_pb2

__all__ = [
    "QueueRates",
    "QueueTotals",
    "QueueView",
    "ReplicaView",
    "Snapshot",
    "WorkerView",
    "rates",
    "render",
    "snapshot_from_protos",
    "totals_from_metrics",
]


@dataclasses.dataclass(frozen=True, slots=True)
class QueueTotals:
    """Counters of one queue since the coordinator started (from its metrics)."""

    submitted: float = 0.0
    succeeded: float = 0.0
    failed: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class QueueRates:
    """Per second, between two scrapes."""

    submitted: float
    succeeded: float
    failed: float


@dataclasses.dataclass(frozen=True, slots=True)
class QueueView:
    name: str
    pending: int
    scheduled: int
    running: int
    dead: int
    workers: int
    #: Seconds the oldest ready task has waited (None when unknown or nothing waits).
    oldest_pending_age: float | None = None
    rates: QueueRates | None = None
    #: Paused (PauseQueue): it accepts submits and dispatches nothing.
    paused: bool = False
    #: The counts that reached ListQueues' cap (each then means "at least").
    pending_capped: bool = False
    scheduled_capped: bool = False
    dead_capped: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    hostname: str
    queues: tuple[str, ...]
    credit: int
    in_flight: int
    draining: bool
    #: Why it is assigned nothing for now (its event loop lags, ...); "" while healthy.
    unhealthy: str = ""

    @property
    def utilisation(self) -> float | None:
        """Share of the worker's slots in use (None when it has none)."""
        slots = self.credit + self.in_flight
        return self.in_flight / slots if slots else None


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaView:
    node_id: str
    address: str
    leader: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    cluster: str
    mode: str
    leader: str | None
    epoch: int
    replicas: tuple[ReplicaView, ...]
    workers: tuple[WorkerView, ...]
    queues: tuple[QueueView, ...]
    recent_evictions: int = 0
    taken_at: datetime | None = None
    #: Why part of the data is missing (a coordinator that did not answer, ...).
    problem: str = ""


class QueueCounts(Protocol):
    """A queue's counts as the API gives them (``conveyor.v1.QueueStats``, or the
    client's ``QueueStats``)."""

    @property
    def name(self) -> str: ...

    @property
    def pending(self) -> int: ...

    @property
    def scheduled(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def dead(self) -> int: ...

    @property
    def workers(self) -> int: ...

    @property
    def paused(self) -> bool: ...

    @property
    def pending_capped(self) -> bool: ...

    @property
    def scheduled_capped(self) -> bool: ...

    @property
    def dead_capped(self) -> bool: ...


def snapshot_from_protos(
    status: admin_service_pb2.GetClusterStatusResponse,
    queues: Iterable[QueueCounts],
    *,
    queue_rates: Mapping[str, QueueRates] | None = None,
    oldest_pending: Mapping[str, float] | None = None,
    taken_at: datetime | None = None,
    problem: str = "",
) -> Snapshot:
    """A snapshot from the API's answers (and optional rates and ages per queue)."""
    queue_rates = queue_rates or {}
    oldest_pending = oldest_pending or {}
    leader = status.leader
    return Snapshot(
        cluster=status.cluster,
        mode=status.mode,
        leader=f"{leader.node_id} ({leader.address})" if leader.node_id else None,
        epoch=status.epoch,
        replicas=tuple(ReplicaView(r.node_id, r.address, r.leader) for r in status.replicas),
        workers=tuple(
            WorkerView(
                w.worker_id,
                w.hostname,
                tuple(w.queues),
                w.credit,
                w.in_flight,
                w.draining,
                w.unhealthy,
            )
            for w in status.workers
        ),
        queues=tuple(
            QueueView(
                q.name,
                q.pending,
                q.scheduled,
                q.running,
                q.dead,
                q.workers,
                oldest_pending.get(q.name),
                queue_rates.get(q.name),
                paused=q.paused,
                pending_capped=q.pending_capped,
                scheduled_capped=q.scheduled_capped,
                dead_capped=q.dead_capped,
            )
            for q in queues
        ),
        recent_evictions=len(status.recent_evictions),
        taken_at=taken_at or datetime.now(UTC),
        problem=problem,
    )


def totals_from_metrics(text: str) -> dict[str, QueueTotals]:
    """Per-queue counters from a coordinator's Prometheus text exposition (summed over
    tenants and types)."""
    sums: dict[str, dict[str, float]] = {}
    wanted = {
        "conveyor_tasks_submitted_total": "submitted",
        "conveyor_tasks_succeeded_total": "succeeded",
        "conveyor_tasks_failed_total": "failed",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = wanted.get(sample.name)
            if field is None:
                continue
            queue = sample.labels.get("queue", "")
            per_queue = sums.setdefault(queue, {})
            per_queue[field] = per_queue.get(field, 0.0) + sample.value
    return {queue: QueueTotals(**fields) for queue, fields in sums.items()}


def rates(
    before: Mapping[str, QueueTotals], after: Mapping[str, QueueTotals], seconds: float
) -> dict[str, QueueRates]:
    """Per-second rates per queue between two scrapes ``seconds`` apart. A counter that
    went down (the coordinator restarted) counts from zero."""
    if seconds <= 0:
        return {}

    def per_second(old: float, new: float) -> float:
        return (new - old if new >= old else new) / seconds

    out = {}
    for queue, now in after.items():
        then = before.get(queue, QueueTotals())
        out[queue] = QueueRates(
            per_second(then.submitted, now.submitted),
            per_second(then.succeeded, now.succeeded),
            per_second(then.failed, now.failed),
        )
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _tally(value: int, capped: bool) -> str:
    """A count; a capped one (ListQueues counts up to a cap) as at least that many."""
    return f"{value:,}+" if capped else f"{value:,}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


def _queues_table(queues: Sequence[QueueView]) -> Table:
    table = Table(title="Queues", title_justify="left", expand=True)
    for column in ("QUEUE", "PENDING", "SCHEDULED", "RUNNING", "DEAD", "WORKERS"):
        table.add_column(column, justify="left" if column == "QUEUE" else "right")
    for column in ("OLDEST PENDING", "IN/S", "DONE/S", "FAILED/S"):
        table.add_column(column, justify="right")
    for q in queues:
        r = q.rates
        unserved = q.pending > 0 and q.workers == 0
        table.add_row(
            Text(f"{q.name} (paused)", style="yellow") if q.paused else q.name,
            _tally(q.pending, q.pending_capped),
            _tally(q.scheduled, q.scheduled_capped),
            f"{q.running:,}",
            Text(_tally(q.dead, q.dead_capped), style="red" if q.dead else ""),
            Text(str(q.workers), style="bold red" if unserved else ""),
            # Capped: the oldest of the first tasks in dispatch order, so at least this.
            _age(q.oldest_pending_age)
            + ("+" if q.pending_capped and q.oldest_pending_age is not None else ""),
            _rate(r.submitted if r else None),
            _rate(r.succeeded if r else None),
            Text(_rate(r.failed if r else None), style="red" if r and r.failed > 0 else ""),
        )
    if not queues:
        table.add_row("(no tasks yet)", *[""] * 9)
    return table


def _workers_table(workers: Sequence[WorkerView]) -> Table:
    table = Table(title="Workers", title_justify="left", expand=True)
    for column in ("WORKER", "HOST", "QUEUES", "IN FLIGHT", "FREE", "UTILISATION", "STATE"):
        table.add_column(column, justify="right" if column in ("IN FLIGHT", "FREE") else "left")
    for w in sorted(workers, key=lambda w: w.worker_id):
        used = w.utilisation
        bar = "-" if used is None else f"{'#' * round(used * 10):<10} {used:>4.0%}"
        table.add_row(
            w.worker_id,
            w.hostname,
            ",".join(w.queues),
            str(w.in_flight),
            str(w.credit),
            Text(bar, style="yellow" if used is not None and used >= 0.9 else ""),
            _state(w),
        )
    if not workers:
        table.add_row(Text("(no worker connected)", style="bold red"), *[""] * 6)
    return table


def _state(worker: WorkerView) -> Text | str:
    if worker.draining:
        return Text("draining", style="yellow")
    return Text("unhealthy", style="bold red") if worker.unhealthy else "active"


def _header(s: Snapshot) -> Text:
    text = Text()
    if not s.cluster and not s.mode:
        # Nothing answered yet: say so rather than "no leader".
        text.append("cluster unknown", style="bold red")
        return text
    text.append(f"cluster {s.cluster} ({s.mode})  ")
    if s.leader:
        text.append("leader ", style="bold")
        text.append(s.leader, style="green")
    else:
        text.append("NO LEADER", style="bold red")
    text.append(f"  epoch {s.epoch}  replicas {len(s.replicas)}")
    busy = sum(w.in_flight for w in s.workers)
    slots = busy + sum(w.credit for w in s.workers)
    text.append(f"  workers {len(s.workers)}")
    unhealthy = sum(1 for w in s.workers if w.unhealthy)
    if unhealthy:
        text.append(f"  unhealthy {unhealthy}", style="bold red")
    if slots:
        text.append(f"  utilisation {busy / slots:.0%}")
    if s.recent_evictions:
        text.append(f"  evictions {s.recent_evictions}", style="yellow")
    if s.taken_at is not None:
        text.append(f"  at {s.taken_at:%H:%M:%S}", style="dim")
    return text


def render(snapshot: Snapshot) -> RenderableType:
    """The whole screen for one snapshot."""
    parts: list[RenderableType] = [_header(snapshot)]
    if snapshot.problem:
        parts.append(Text(snapshot.problem, style="bold red"))
    parts.append(_queues_table(snapshot.queues))
    parts.append(_workers_table(snapshot.workers))
    return Group(*parts)
