"""Worker health with a large tenant: its peers are tallied, not walked per heartbeat, so an
overloaded fleet (every worker lagging) costs one walk a second, not n² (issue 19)."""

from __future__ import annotations

from collections.abc import Iterator

from conveyor.coordinator.dispatch.health import TALLY_MIN_PEERS, TALLY_SECONDS, WorkerHealth
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.v1 import worker_service_pb2 as pb

LIMIT = 1.0


class Walked:
    """The sessions, counting how often they are walked."""

    def __init__(self, sessions: list[WorkerSession]) -> None:
        self.sessions = sessions
        self.walks = 0

    def __iter__(self) -> Iterator[WorkerSession]:
        self.walks += 1
        return iter(self.sessions)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(size: int) -> list[WorkerSession]:
    return [
        WorkerSession(
            session_id=f"w{i}", worker_id=f"w{i}", tenant="t", queues=("q",), task_types=("a",)
        )
        for i in range(size)
    ]


def lagging(seconds: float) -> pb.Heartbeat:
    beat = pb.Heartbeat()
    beat.loop_lag.FromNanoseconds(int(seconds * 1e9))
    return beat


def judge(sessions: Walked, clock: Clock) -> WorkerHealth:
    return WorkerHealth(
        sessions,
        max_loop_lag=LIMIT,
        heartbeat_interval=10.0,
        metrics=CoordinatorMetrics.off(),
        wake=lambda: None,
        clock=clock,
    )


async def test_an_overloaded_large_fleet_is_walked_once_a_tally_period() -> None:
    clock = Clock()
    sessions = Walked(fleet(TALLY_MIN_PEERS * 2))
    health = judge(sessions, clock)
    for session in sessions.sessions:
        health.heartbeat(session, lagging(3.0))
    # All lag: overload, no one is marked; the first judgment walked, the rest used its
    # tally (made before the others reported: none of them counted as a calm peer).
    assert not any(s.unhealthy for s in sessions.sessions)
    assert sessions.walks == 1
    clock.now += TALLY_SECONDS
    for session in sessions.sessions:
        health.heartbeat(session, lagging(3.0))
    assert sessions.walks == 2
    assert not any(s.unhealthy for s in sessions.sessions)


async def test_a_lagging_worker_in_a_calm_large_fleet_is_still_marked() -> None:
    clock = Clock()
    sessions = Walked(fleet(TALLY_MIN_PEERS * 2))
    health = judge(sessions, clock)
    slow, *calm = sessions.sessions
    for session in calm:
        health.heartbeat(session, lagging(0.01))
    health.heartbeat(slow, lagging(2.0))
    assert slow.unhealthy.startswith(
        f"event loop lag 2s, limit 1s, while {len(calm)} of the tenant's {len(calm)}"
    )
    assert sessions.walks == 1


async def test_a_small_tenant_is_walked_each_time_exactly() -> None:
    clock = Clock()
    sessions = Walked(fleet(3))
    health = judge(sessions, clock)
    for session in sessions.sessions:
        health.heartbeat(session, lagging(3.0))
    assert sessions.walks == 3
