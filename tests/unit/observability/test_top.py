"""The rendering of ``conveyor top`` (conveyor.observability.top)."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from conveyor.observability.metrics import CoordinatorMetrics
from conveyor.observability.top import (
    QueueRates,
    QueueTotals,
    Snapshot,
    rates,
    render,
    snapshot_from_protos,
    totals_from_metrics,
)
from conveyor.v1 import admin_service_pb2, task_pb2


def screen(snapshot: Snapshot) -> str:
    console = Console(width=140, record=True, color_system=None)
    console.print(render(snapshot))
    return console.export_text()


def status(leader: bool = True) -> admin_service_pb2.GetClusterStatusResponse:
    me = admin_service_pb2.CoordinatorInfo(node_id="node-a", address="10.0.0.5:50051", leader=True)
    other = admin_service_pb2.CoordinatorInfo(node_id="node-b", address="10.0.0.6:50051")
    return admin_service_pb2.GetClusterStatusResponse(
        cluster="prod",
        mode="etcd",
        leader=me if leader else None,
        epoch=12,
        replicas=[me, other],
        workers=[
            admin_service_pb2.WorkerInfo(
                worker_id="w-1", hostname="h1", queues=["emails"], credit=1, in_flight=9
            ),
            admin_service_pb2.WorkerInfo(
                worker_id="w-3",
                hostname="h3",
                queues=["emails"],
                unhealthy="event loop lag 2.5s, limit 1s",
            ),
            admin_service_pb2.WorkerInfo(
                worker_id="w-2",
                hostname="h2",
                queues=["emails", "reports"],
                credit=10,
                in_flight=0,
                draining=True,
            ),
        ],
        recent_evictions=[admin_service_pb2.WorkerEviction(worker_id="w-0", reason="silent")],
    )


QUEUES = [
    task_pb2.QueueStats(name="emails", pending=1234, scheduled=5, running=9, dead=2, workers=2),
    task_pb2.QueueStats(name="orphans", pending=7, workers=0),
]


def test_the_screen_shows_leadership_queues_workers_and_rates() -> None:
    snapshot = snapshot_from_protos(
        status(),
        QUEUES,
        queue_rates={"emails": QueueRates(submitted=120.0, succeeded=118.5, failed=0.5)},
        oldest_pending={"emails": 75.0},
        taken_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    text = screen(snapshot)
    assert "leader node-a (10.0.0.5:50051)" in text
    assert "epoch 12" in text and "replicas 2" in text
    assert "workers 3" in text and "utilisation 45%" in text  # 9 of 20 slots
    assert "unhealthy 1" in text
    assert "unhealthy" in next(line for line in text.splitlines() if "w-3" in line)
    assert "evictions 1" in text and "03:04:05" in text
    emails = next(line for line in text.splitlines() if "emails " in line and "1,234" in line)
    for cell in ("1,234", "5", "9", "2", "1.2m", "120.0/s", "118.5/s", "0.5/s"):
        assert cell in emails, cell
    w1 = next(line for line in text.splitlines() if "w-1" in line)
    assert "90%" in w1 and "#########" in w1
    assert "draining" in next(line for line in text.splitlines() if "w-2" in line)


def test_no_leader_no_workers_and_no_queues_are_said_plainly() -> None:
    empty = admin_service_pb2.GetClusterStatusResponse(cluster="c", mode="single-node")
    text = screen(snapshot_from_protos(empty, [], problem="node-b did not answer"))
    assert "NO LEADER" in text
    assert "(no worker connected)" in text
    assert "(no tasks yet)" in text
    assert "node-b did not answer" in text


def test_rates_come_from_two_scrapes_of_the_metrics_endpoint() -> None:
    from prometheus_client import generate_latest

    m = CoordinatorMetrics(process_metrics=False)
    row = {"tenant": "default", "queue": "emails", "type": "send"}
    m.count_submitted([("default", "emails", "send")] * 10)
    before = totals_from_metrics(generate_latest(m.registry).decode())
    m.count_submitted([("default", "emails", "send")] * 30 + [("default", "emails", "other")] * 10)
    m.record_results(
        [{**row, "state": 4, "run_seconds": 0.1, "end_to_end_seconds": 0.2}] * 20
        + [{**row, "state": 2, "run_seconds": 0.1, "end_to_end_seconds": None}] * 2
    )
    after = totals_from_metrics(generate_latest(m.registry).decode())
    assert before["emails"] == QueueTotals(submitted=10)
    assert after["emails"] == QueueTotals(submitted=50, succeeded=20, failed=2)
    assert rates(before, after, 2.0)["emails"] == QueueRates(20.0, 10.0, 1.0)
    # A restarted coordinator's counters start again from zero.
    assert rates(after, before, 1.0)["emails"].submitted == 10.0
    assert rates(before, after, 0) == {}


def test_a_cluster_never_reached_is_unknown_not_leaderless() -> None:
    nothing = admin_service_pb2.GetClusterStatusResponse()
    text = screen(snapshot_from_protos(nothing, [], problem="cannot read the cluster"))
    assert "cluster unknown" in text and "NO LEADER" not in text
    assert "cannot read the cluster" in text


def test_a_paused_queue_says_so() -> None:
    queues = [*QUEUES, task_pb2.QueueStats(name="held", pending=3, paused=True)]
    text = screen(snapshot_from_protos(status(), queues))
    assert "held (paused)" in text
    assert "emails (paused)" not in text


def test_a_capped_count_shows_as_at_least() -> None:
    # ListQueues counts up to a cap (issue 19, seventh round): beyond it, "at least".
    deep = task_pb2.QueueStats(
        name="deep",
        pending=10_000,
        pending_capped=True,
        scheduled=10_000,
        dead=10_000,
        dead_capped=True,
        workers=1,
    )
    queues = [deep]
    oldest = {"deep": 90.0}
    text = screen(snapshot_from_protos(status(), queues, oldest_pending=oldest))
    (row,) = [line for line in text.splitlines() if "deep" in line]
    cells = [cell.strip() for cell in row.split("│")[1:8]]
    # pending, scheduled (exact), running, dead, workers, oldest pending (at least)
    assert cells == ["deep", "10,000+", "10,000", "0", "10,000+", "1", "1.5m+"], row
