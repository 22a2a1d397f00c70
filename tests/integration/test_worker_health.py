"""Worker health: a worker process whose handler blocks its event loop reports the lag
with its heartbeats, is assigned nothing while it lags (conveyor status and the metrics
say so), and gets work again once it recovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cluster import WorkerProcess
from metrics_scrape import scrape
from testsupport import eventually, submit

from conveyor.cli.status_command import print_status
from conveyor.coordinator import Coordinator
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.coordinator.store.tasks import SUCCEEDED
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, task_service_pb2_grpc

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
) -> None:
    worker = WorkerProcess(
        coordinator.address, tmp_path / "effects.log", log_dir=tmp_path, concurrency=4
    ).start()
    try:

        def live() -> WorkerSession | None:
            return next((s for s in coordinator.sessions if not s.closed), None)

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
        (info,) = reply.workers
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
