"""Worker health: a worker process whose handler blocks its event loop reports the lag
with its heartbeats, is assigned nothing while it lags (conveyor status and the metrics
say so), and gets work again once it recovers; a worker whose attempts fail while its
peers' succeed sits out a probation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cluster import WorkerProcess
from google.protobuf import duration_pb2
from metrics_scrape import scrape
from testsupport import RawWorker, eventually, submit

from conveyor.cli.status_command import print_status
from conveyor.coordinator import Coordinator
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.coordinator.store.tasks import SUCCEEDED
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_service_pb2_grpc,
    worker_service_pb2,
)

LIMIT = 0.2


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    return {"max_worker_loop_lag": LIMIT, "metrics_listen": "127.0.0.1:0"}


@pytest.mark.slow
async def test_a_worker_whose_loop_lags_gets_no_work_until_it_recovers(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    raw_workers: Callable[[], RawWorker],
) -> None:
    # A calm peer of the same tenant (on another queue: it takes none of this work). A
    # worker is judged against its peers: were they all lagging, none would be marked.
    peer = raw_workers()
    await peer.connect("calm-peer", credits=0, types=("noop",), queues=("elsewhere",))
    calm = duration_pb2.Duration(nanos=1_000_000)
    await peer.send(heartbeat=worker_service_pb2.Heartbeat(loop_lag=calm))
    worker = WorkerProcess(
        coordinator.address, tmp_path / "effects.log", log_dir=tmp_path, concurrency=4
    ).start()
    try:

        def live() -> WorkerSession | None:
            return next(
                (s for s in coordinator.sessions if not s.closed and s.worker_id != "calm-peer"),
                None,
            )

        session = await eventually(live, timeout=30, what="the worker connected")
        metrics = coordinator.telemetry.metrics_url

        async def beats() -> float:
            return (await scrape(metrics)).value("conveyor_worker_loop_lag_seconds_count")

        await eventually(beats, timeout=10, what="a heartbeat with its loop lag")
        assert not session.unhealthy and session.loop_lag < LIMIT

        blocker = await submit(stub, "block-loop", payload=b"2.5")
        await eventually(lambda: session.unhealthy, timeout=10, what="the worker unhealthy")
        assert session.unhealthy.startswith("event loop lag") and not session.wants_work
        later = await submit(stub, "noop")  # it has free slots, but lags: not assigned

        # conveyor status and the metrics say so.
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            reply = await admin.GetClusterStatus(admin_service_pb2.GetClusterStatusRequest())
        (info,) = [w for w in reply.workers if w.worker_id == session.worker_id]
        assert info.unhealthy == session.unhealthy
        assert info.loop_lag.ToNanoseconds() / 1e9 > LIMIT
        print_status(reply)
        shown = capsys.readouterr().out
        assert "unhealthy" in shown and f"is assigned nothing for now: {info.unhealthy}" in shown
        page = await scrape(metrics)
        assert page.value("conveyor_worker_unhealthy", tenant="default") == 1
        assert page.value("conveyor_worker_loop_lag_seconds_bucket", le="0.25") < page.value(
            "conveyor_worker_loop_lag_seconds_count"
        )

        # The blocking handler done, the lag falls: healthy again, and assigned work.
        await eventually(lambda: not session.unhealthy, timeout=15, what="the worker recovered")

        async def done(task_id: str) -> bool:
            state = await db.fetchval("SELECT state FROM tasks WHERE id = $1::uuid", task_id)
            return bool(state == SUCCEEDED)

        await eventually(lambda: done(later.id), timeout=10, what="the later task done")
        assert await done(blocker.id)
        blocked_until = await db.fetchval(
            "SELECT end_time FROM task_attempts WHERE task_id = $1::uuid", blocker.id
        )
        started = await db.fetchval(
            "SELECT start_time FROM task_attempts WHERE task_id = $1::uuid", later.id
        )
        assert started > blocked_until, "the later task was assigned while the worker lagged"
        assert (await scrape(metrics)).value("conveyor_worker_unhealthy", tenant="default") == 0
    finally:
        await worker.stop(15)


async def test_a_worker_failing_where_its_peers_succeed_sits_out_a_probation(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
) -> None:
    good, bad = raw_workers(), raw_workers()
    await good.connect("good", credits=0, types=("noop",), queues=("default",))
    await bad.connect("bad", credits=0, types=("noop",), queues=("default",))
    sessions = {s.worker_id: s for s in coordinator.sessions}

    async def report(worker: RawWorker, name: str, finished: int, failed: int) -> None:
        """One heartbeat with these counts, taken in by the coordinator."""
        beat = worker_service_pb2.Heartbeat(finished=finished, failed=failed)
        await worker.send(heartbeat=beat)
        await eventually(lambda: sessions[name].recent_finished >= finished / 2)

    # The good one succeeds; the bad one fails most of its attempts: it sits out.
    await report(good, "good", 100, 0)
    await report(bad, "bad", 100, 90)
    assert sessions["bad"].unhealthy == (
        "90 of its last 100 attempts failed, against 0% on the tenant's other workers"
    )
    assert not sessions["good"].unhealthy
    await bad.send(credit=worker_service_pb2.Credit(credits=5))
    first = await submit(stub, "noop")
    await good.send(credit=worker_service_pb2.Credit(credits=1))
    (assigned,) = await good.assignments(1)
    assert assigned.lease.task_id == first.id
    done = worker_service_pb2.TaskResult(
        lease=assigned.lease, outcome=worker_service_pb2.TASK_OUTCOME_SUCCEEDED
    )
    await good.send(results=worker_service_pb2.Results(results=[done]))

    # After its probation (5 heartbeat intervals) it is tried again, counts cleared.
    await eventually(lambda: not sessions["bad"].unhealthy, timeout=10, what="the probation over")
    second = await submit(stub, "noop")
    (assigned,) = await bad.assignments(1)
    assert assigned.lease.task_id == second.id

    # When every worker fails, the downstream is at fault (the breaker's business): no one
    # is marked.
    await report(good, "good", 100, 100)
    await report(bad, "bad", 100, 100)
    assert not sessions["good"].unhealthy and not sessions["bad"].unhealthy
