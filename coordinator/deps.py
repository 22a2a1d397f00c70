"""What the coordinator's services share, handed to each as one small object.

:class:`Deps` is built once by ``server.py``: the configuration, the database, the office
(leadership: epoch, fence, what to do when fenced), the connected workers, the task
watchers, and :class:`Events`, the wake-ups between services (a submit commits: the
dispatcher looks for a worker; a task is scheduled: the promoter looks at its clock);
and the telemetry services record into: ``metrics`` (None when the coordinator exports
none, so nothing is recorded) and ``tracing`` (disabled unless an OTLP endpoint is set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.lifecycle.watchers import TaskWatchers
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.store.sql import Fence
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.observability.tracing import Tracing


def _nobody() -> str:
    return ""


class Office:
    """Whether this coordinator leads, with which epoch, and how it steps down.

    The coordinator takes and leaves office (``server.py``); services only read
    :meth:`fence` and report :meth:`fenced`.
    """

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.epoch = 0
        self.leader = False
        self.on_fenced: Callable[[Fenced], None] = lambda exc: None
        self.leader_address: Callable[[], str] = _nobody
        self.on_refused: Callable[[], None] | None = None
        """Called each time the fence refuses a write of this office's (for metrics)."""

    def fence(self) -> Fence:
        """The fencing token of the current term."""
        return Fence(self.cluster, self.epoch, self.on_refused)

    def is_leader(self) -> bool:
        return self.leader

    def fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: leave office (at once, not awaited)."""
        self.on_fenced(exc)


class Events:
    """Wake-ups between services; listeners register in their constructors."""

    def __init__(self) -> None:
        self._ready: list[Callable[[str, str], None]] = []
        self._scheduled: list[Callable[[datetime], None]] = []
        self._schedules_changed: list[Callable[[], None]] = []

    def on_ready(self, listener: Callable[[str, str], None]) -> None:
        self._ready.append(listener)

    def ready(self, tenant: str, queue: str) -> None:
        """Work may be ready on (tenant, queue): a submit, promotion or release committed."""
        for listener in self._ready:
            listener(tenant, queue)

    def on_scheduled(self, listener: Callable[[datetime], None]) -> None:
        self._scheduled.append(listener)

    def scheduled(self, run_at: datetime) -> None:
        """A task became SCHEDULED for ``run_at``."""
        for listener in self._scheduled:
            listener(run_at)

    def on_schedules_changed(self, listener: Callable[[], None]) -> None:
        self._schedules_changed.append(listener)

    def schedules_changed(self) -> None:
        """A schedule was created, changed or resumed."""
        for listener in self._schedules_changed:
            listener()


@dataclass(frozen=True)
class Deps:
    """Everything a coordinator service depends on."""

    config: CoordinatorConfig
    db: Database
    office: Office
    sessions: SessionRegistry
    watchers: TaskWatchers
    events: Events
    metrics: CoordinatorMetrics | None = None
    tracing: Tracing = field(default_factory=Tracing.disabled)
