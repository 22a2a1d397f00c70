"""Worker health: a worker whose event loop lags, or whose attempts fail where its tenant's
other workers' succeed, is assigned nothing for a while.

Each heartbeat carries the worker's load (``Heartbeat.loop_lag``, ``in_flight``,
``free_slots``, and the attempts ``finished`` and ``failed`` since the previous one;
``worker/_health.py`` measures the lag): one reading per heartbeat interval per worker,
never per task. Two rules, judged at each heartbeat:

- **Loop lag.** A handler that blocks its worker's event loop delays that worker's every
  task, heartbeat and result, so more work sent there waits behind it while other workers
  may be free. A lag above ``max_worker_loop_lag`` marks the session unhealthy when most
  of its tenant's other workers (those that report a lag) stay under the limit; a later
  heartbeat reporting at most half the limit makes it healthy again (hysteresis: a worker
  hovering at the limit does not flap). When the tenant's workers all lag (the machines
  are overloaded) or a worker has no peer, no one is marked: sending the work elsewhere
  would not help, and stopping dispatch altogether would only stall it.
- **Error rate.** A worker that failed at least :data:`FAILING` of its recent attempts
  (at least :data:`MIN_ATTEMPTS` of them, counts halved at each heartbeat) while the other
  workers of its tenant failed under :data:`PEERS_FAILING` of theirs is broken itself (a
  missing dependency, a bad host), not its downstream: it is marked unhealthy for
  :data:`PROBATION_HEARTBEATS` heartbeat intervals, then tried again with its counts
  cleared. When every worker fails, no one is marked: that is the task type's
  downstream, the circuit breaker's business.

An unhealthy session's :attr:`WorkerSession.wants_work` is false: the dispatch policy
leaves it out of every round and the submit hand-off passes it by (its running tasks go
on, their leases renewed as ever); recovery wakes the dispatcher. ``conveyor status``
shows why (``WorkerInfo.unhealthy``); the metrics count unhealthy sessions per tenant
(``conveyor_worker_unhealthy``) and record every reported lag
(``conveyor_worker_loop_lag_seconds``). A worker that reports no lag (an older SDK,
another language) is not judged by it.

Both rules look at the tenant's other workers only when a worker lags or fails, but an
overloaded fleet lags everywhere: every heartbeat then walked every peer, n² a heartbeat
interval (10,000 workers: 10 million visits a second). A tenant of at least
:data:`TALLY_MIN_PEERS` sessions is therefore judged against a tally of its sessions made
at most once every :data:`TALLY_SECONDS` (less the worker's own share); smaller ones are
walked each time, exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.dispatch.sessions import WorkerSession

_log = logging.getLogger("conveyor.coordinator.health")

MIN_ATTEMPTS = 20
"""Recent attempts a worker (and its peers, together) must have before its error rate counts."""
FAILING = 0.5
"""The share of failed recent attempts that marks a worker, when its peers' is low."""
PEERS_FAILING = 0.1
"""The share of failed attempts under which the other workers count as succeeding."""
DECAY = 0.5
"""What each heartbeat keeps of the recent counts: a window of a few intervals."""
PROBATION_HEARTBEATS = 5
"""Heartbeat intervals a worker marked for its error rate is assigned nothing."""
TALLY_MIN_PEERS = 64
"""Sessions of a tenant from which its peers are tallied, not walked per judgment."""
TALLY_SECONDS = 1.0
"""How old a tenant's tally may be (heartbeats come every few seconds per worker)."""


@dataclass(frozen=True, slots=True)
class _Tally:
    """What the rules need of a group of sessions: how many report a lag, how many of
    those are within the limit, and their recent attempts."""

    reporting: int = 0
    calm: int = 0
    finished: float = 0.0
    failed: float = 0.0

    def plus(self, session: WorkerSession, limit: float) -> _Tally:
        return _Tally(
            self.reporting + session.reports_lag,
            self.calm + (session.reports_lag and session.loop_lag <= limit),
            self.finished + session.recent_finished,
            self.failed + session.recent_failed,
        )

    def minus(self, session: WorkerSession, limit: float) -> _Tally:
        # Clamped: the session's share may have changed since the tally was made.
        return _Tally(
            max(0, self.reporting - session.reports_lag),
            max(0, self.calm - (session.reports_lag and session.loop_lag <= limit)),
            max(0.0, self.finished - session.recent_finished),
            max(0.0, self.failed - session.recent_failed),
        )


class WorkerHealth:
    """Judges each session by its heartbeats (module docstring)."""

    def __init__(
        self,
        sessions: Iterable[WorkerSession],
        *,
        max_loop_lag: float,
        heartbeat_interval: float,
        metrics: CoordinatorMetrics,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._limit = max_loop_lag
        """Seconds of lag past which a worker is assigned nothing; 0: never judged by it."""
        self._probation = PROBATION_HEARTBEATS * heartbeat_interval
        self._metrics = metrics
        self._wake = wake
        self._tallies: dict[str, tuple[float, int, _Tally]] = {}
        """Per tenant: when its sessions were tallied, how many, and the tally (them all)."""

    def heartbeat(self, session: WorkerSession, beat: worker_service_pb2.Heartbeat) -> None:
        """Takes in the load one heartbeat reports, and judges the session."""
        lag: float | None = None
        if beat.HasField("loop_lag"):
            lag = session.loop_lag = beat.loop_lag.ToNanoseconds() / 1e9
            session.reports_lag = True
            self._metrics.record_loop_lag(lag)
        session.recent_finished = session.recent_finished * DECAY + beat.finished
        session.recent_failed = session.recent_failed * DECAY + beat.failed
        now = self._clock()
        if session.unhealthy:
            if self._recovered(session, lag, now):
                _log.info(
                    "worker %s (tenant %s) is healthy again; assigning it work",
                    session.worker_id, session.tenant,
                )  # fmt: skip
                session.unhealthy = ""
                session.unhealthy_until = 0.0
                session.recent_finished = session.recent_failed = 0.0  # judged afresh
                if session.wants_work:
                    self._wake()
            return
        problem = self._lag_problem(session, lag)
        if problem is None and (problem := self._error_problem(session)) is not None:
            session.unhealthy_until = now + self._probation
        if problem is not None:
            session.unhealthy = problem
            _log.warning(
                "worker %s (tenant %s) is unhealthy: %s; assigning it nothing until it "
                "recovers", session.worker_id, session.tenant, problem,
            )  # fmt: skip

    def _recovered(self, session: WorkerSession, lag: float | None, now: float) -> bool:
        if session.unhealthy_until:  # marked for its errors: a probation
            return now >= session.unhealthy_until
        return lag is not None and lag <= self._limit / 2

    def _lag_problem(self, session: WorkerSession, lag: float | None) -> str | None:
        limit = self._limit
        if lag is None or limit <= 0 or lag <= limit:
            return None
        # Rare (a lag past the limit): only then are its peers looked at.
        tally = self._others(session)
        peers, calm = tally.reporting, tally.calm
        if calm * 2 <= peers or not peers:
            return None  # most lag too (overload), or no peer to send the work to
        return (
            f"event loop lag {lag:.3g}s, limit {limit:g}s, while {calm} of the tenant's "
            f"{peers} other workers stay under it (a handler blocks its loop?)"
        )

    def _others(self, session: WorkerSession) -> _Tally:
        """The tally of the tenant's other live sessions (module docstring)."""
        limit, now = self._limit, self._clock()
        cached = self._tallies.get(session.tenant)
        if cached is not None:
            at, size, tally = cached
            if size >= TALLY_MIN_PEERS and now - at < TALLY_SECONDS:
                return tally.minus(session, limit)
        reporting = calm = 0
        finished = failed = 0.0
        size = 1
        for other in self._sessions:
            if other is not session and other.tenant == session.tenant and not other.closed:
                size += 1
                if other.reports_lag:
                    reporting += 1
                    calm += other.loop_lag <= limit
                finished += other.recent_finished
                failed += other.recent_failed
        others = _Tally(reporting, calm, finished, failed)
        self._tallies[session.tenant] = (now, size, others.plus(session, limit))
        return others

    def _error_problem(self, session: WorkerSession) -> str | None:
        finished, failed = session.recent_finished, session.recent_failed
        if finished < MIN_ATTEMPTS or failed < FAILING * finished:
            return None
        # Rare (a worker failing most of its attempts): only then are its peers counted.
        tally = self._others(session)
        peers_finished, peers_failed = tally.finished, tally.failed
        if peers_finished < MIN_ATTEMPTS or peers_failed >= PEERS_FAILING * peers_finished:
            return None
        return (
            f"{failed:.0f} of its last {finished:.0f} attempts failed, against "
            f"{peers_failed / peers_finished:.0%} on the tenant's other workers"
        )
