"""Worker health's rules (coordinator/dispatch/health.py), judged against peers: a worker
is marked when it lags or fails where its tenant's other workers do not, never when they
all do (overload, a broken downstream) or when it has no peer."""

from __future__ import annotations

from conveyor.coordinator.dispatch.health import WorkerHealth
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.v1 import worker_service_pb2 as pb

LIMIT = 1.0


def session(worker_id: str, tenant: str = "t") -> WorkerSession:
    return WorkerSession(
        session_id=worker_id, worker_id=worker_id, tenant=tenant, queues=("q",), task_types=("a",)
    )


def beat(lag: float | None = None, finished: int = 0, failed: int = 0) -> pb.Heartbeat:
    message = pb.Heartbeat(finished=finished, failed=failed)
    if lag is not None:
        message.loop_lag.FromNanoseconds(int(lag * 1e9))
    return message


def judge(*sessions: WorkerSession) -> tuple[WorkerHealth, list[int]]:
    woken: list[int] = []
    health = WorkerHealth(
        sessions,
        max_loop_lag=LIMIT,
        heartbeat_interval=10.0,
        metrics=CoordinatorMetrics.off(),
        wake=lambda: woken.append(1),
    )
    return health, woken


async def test_a_lagging_worker_among_calm_ones_is_marked_until_half_the_limit() -> None:
    slow, calm, other_tenant = session("slow"), session("calm"), session("x", tenant="u")
    health, woken = judge(slow, calm, other_tenant)
    health.heartbeat(other_tenant, beat(lag=5.0))  # another tenant's: no peer of slow's
    health.heartbeat(calm, beat(lag=0.01))
    health.heartbeat(slow, beat(lag=2.0))
    assert slow.unhealthy.startswith("event loop lag 2s, limit 1s, while 1 of the tenant's 1")
    assert not calm.unhealthy and not other_tenant.unhealthy
    slow.credit = 3
    assert not slow.wants_work
    health.heartbeat(slow, beat(lag=0.6))  # under the limit, not under half: still marked
    assert slow.unhealthy and not woken
    health.heartbeat(slow, beat(lag=0.4))
    assert not slow.unhealthy and slow.wants_work and woken == [1]


async def test_no_one_is_marked_when_all_lag_or_alone() -> None:
    a, b = session("a"), session("b")
    health, _ = judge(a, b)
    health.heartbeat(a, beat(lag=3.0))  # b has reported nothing yet: a has no peer to judge by
    health.heartbeat(b, beat(lag=2.0))  # a lags too: overload, not b
    assert not a.unhealthy and not b.unhealthy
    alone = session("alone")
    health, _ = judge(alone)
    health.heartbeat(alone, beat(lag=9.0))
    assert not alone.unhealthy


async def test_a_worker_failing_where_its_peers_succeed_is_marked_not_when_all_fail() -> None:
    bad, good = session("bad"), session("good")
    health, _ = judge(bad, good)
    health.heartbeat(good, beat(finished=30, failed=1))
    health.heartbeat(bad, beat(finished=10, failed=10))  # too few attempts to judge
    judged = [bad.unhealthy]
    health.heartbeat(bad, beat(finished=30, failed=30))  # 35 of 35 recent (decayed)
    judged.append(bad.unhealthy)
    assert judged == [
        "",
        "35 of its last 35 attempts failed, against 3% on the tenant's other workers",
    ]
    assert bad.unhealthy_until > 0

    worse, also_bad = session("worse"), session("also-bad")
    health, _ = judge(worse, also_bad)
    health.heartbeat(also_bad, beat(finished=40, failed=40))
    health.heartbeat(worse, beat(finished=40, failed=40))
    assert not worse.unhealthy and not also_bad.unhealthy
