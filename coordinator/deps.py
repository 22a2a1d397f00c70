"""What the coordinator's services share, handed to each as one small object.

:class:`Deps` is built once by ``server.py``: the configuration, the database, the office
(leadership: epoch, fence, what to do when fenced), the connected workers, the task
watchers, the after-commit path every task state change takes
(``lifecycle/transitions.py``: a submit commits, the dispatcher's listener looks for a
worker; a task is scheduled, the promoter's looks at its clock), and the telemetry
services record into: ``metrics`` (``CoordinatorMetrics.off()`` when the coordinator
exports none, so nothing is recorded) and ``tracing`` (disabled unless an OTLP endpoint
is set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.lifecycle.transitions import AfterCommit
from conveyor.coordinator.store.sql import Fence
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.observability.tracing import Tracing

if TYPE_CHECKING:
    # Types only: the sessions and the watchers import what imports this module.
    from conveyor.coordinator.config import CoordinatorConfig
    from conveyor.coordinator.dispatch.sessions import SessionRegistry
    from conveyor.coordinator.lifecycle.watchers import TaskWatchers
    from conveyor.coordinator.store.db import Database


def _nobody() -> str:
    return ""


class Office:
    """Whether this coordinator leads, with which epoch, and how it steps down.

    The coordinator takes and leaves office (``leader/leadership.py``); services only read
    :meth:`fence` and report :meth:`fenced`.
    """

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.epoch = 0
        self.leader = False
        self.on_fenced: Callable[[Fenced], None] = lambda exc: None
        self.locate_leader: Callable[[], str] = _nobody
        """Where the leader is, as this coordinator knows it (set by leadership)."""
        self.on_refused: Callable[[], None] | None = None
        """Called each time the fence refuses a write of this office's (for metrics)."""

    def fence(self) -> Fence:
        """The fencing token of the current term."""
        return Fence(self.cluster, self.epoch, self.on_refused)

    def is_leader(self) -> bool:
        return self.leader

    def leader_address(self) -> str:
        """The leader's address ("" when unknown)."""
        return self.locate_leader()

    def fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: leave office (at once, not awaited)."""
        self.on_fenced(exc)


@dataclass(frozen=True)
class Deps:
    """Everything a coordinator service depends on."""

    config: CoordinatorConfig
    db: Database
    office: Office
    sessions: SessionRegistry
    watchers: TaskWatchers
    after_commit: AfterCommit = field(default_factory=AfterCommit)
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics.off)
    tracing: Tracing = field(default_factory=Tracing.disabled)

    def __post_init__(self) -> None:
        # The listeners of what every coordinator has: WatchTask's watchers, and the
        # sessions (a cancelled attempt is called off on its worker's stream).
        self.after_commit.listen(self.watchers.on_transitions)
        self.after_commit.listen(self.sessions.on_transitions)
