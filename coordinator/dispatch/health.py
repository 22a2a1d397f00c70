"""Worker health: a worker whose event loop lags is assigned nothing until it recovers.

Each heartbeat carries the worker's load (``Heartbeat.loop_lag``, ``in_flight``,
``free_slots``; ``worker/_health.py`` measures the lag): once per heartbeat interval per
worker, never per task. A handler that blocks its worker's event loop delays that
worker's every task, heartbeat and result, so more work sent there waits behind it while
other workers may be free. When a heartbeat reports a lag above ``max_worker_loop_lag``
the session is marked unhealthy and :attr:`WorkerSession.wants_work` turns false: the
dispatch policy leaves it out of every round and the submit hand-off passes it by (its
running tasks go on, their leases renewed as ever). A later heartbeat reporting at most
half the limit makes it healthy again (hysteresis: a worker hovering at the limit does
not flap) and wakes the dispatcher. ``conveyor status`` shows why (``WorkerInfo.unhealthy``);
the metrics count unhealthy sessions per tenant (``conveyor_worker_unhealthy``) and
record every reported lag (``conveyor_worker_loop_lag_seconds``). A worker that reports
no lag (an older SDK, another language) is never judged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.dispatch.sessions import WorkerSession

_log = logging.getLogger("conveyor.coordinator.health")


class WorkerHealth:
    """Judges each session by its heartbeats (module docstring)."""

    def __init__(
        self, max_loop_lag: float, metrics: CoordinatorMetrics, wake: Callable[[], None]
    ) -> None:
        self._limit = max_loop_lag
        """Seconds of lag past which a worker is assigned nothing; 0: never judged."""
        self._metrics = metrics
        self._wake = wake

    def heartbeat(self, session: WorkerSession, beat: worker_service_pb2.Heartbeat) -> None:
        """Takes in the load one heartbeat reports."""
        if not beat.HasField("loop_lag"):
            return
        lag = beat.loop_lag.ToNanoseconds() / 1e9
        session.loop_lag = lag
        self._metrics.record_loop_lag(lag)
        limit = self._limit
        if limit <= 0:
            return
        if session.unhealthy:
            if lag <= limit / 2:
                session.unhealthy = ""
                _log.info(
                    "worker %s (tenant %s) recovered: event loop lag %.3gs; assigning it "
                    "work again", session.worker_id, session.tenant, lag,
                )  # fmt: skip
                if session.wants_work:
                    self._wake()
        elif lag > limit:
            session.unhealthy = f"event loop lag {lag:.3g}s, limit {limit:g}s"
            _log.warning(
                "worker %s (tenant %s) is unhealthy: its event loop ran %.3gs late (limit "
                "%gs; a handler blocks it?); assigning it nothing until it recovers",
                session.worker_id, session.tenant, lag, limit,
            )  # fmt: skip
