"""A coordinator's own metrics endpoint, scraped over HTTP while the test drives real tasks
through it: every metric the coordinator exports moves as the work says it must.

Each assertion names a family: removing a recorder (or renaming a metric) fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from etcd_servers import EtcdServer
from google.protobuf import duration_pb2
from metrics_scrape import Page, scrape
from testsupport import RawWorker, coordinator_config, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store import leadership
from conveyor.v1 import (
    schedule_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
)

TASK_SERVICE = "conveyor.v1.TaskService"
SUCCEEDED = worker_service_pb2.TASK_OUTCOME_SUCCEEDED
FAILED = worker_service_pb2.TASK_OUTCOME_FAILED
INTERRUPTED = worker_service_pb2.TASK_OUTCOME_INTERRUPTED


@pytest.fixture
async def coordinator(database_dsn: str) -> AsyncIterator[Coordinator]:
    coord = Coordinator(coordinator_config(database_dsn, metrics_listen="127.0.0.1:0"))
    await coord.start()
    try:
        yield coord
    finally:
        await coord.stop(grace=1.0)


async def page(coordinator: Coordinator) -> Page:
    return await scrape(coordinator.telemetry.metrics_url)


def by_type(
    assignments: list[worker_service_pb2.Assignment],
) -> dict[str, list[worker_service_pb2.Assignment]]:
    out: dict[str, list[worker_service_pb2.Assignment]] = {}
    for a in assignments:
        out.setdefault(a.type, []).append(a)
    return out


async def test_the_task_lifecycle_moves_every_task_metric(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
) -> None:
    never = task_pb2.RetryPolicy(initial_backoff=duration_pb2.Duration(seconds=3600))
    for _ in range(3):
        await submit(stub, "ok", queue="m")
    await submit(stub, "fail", queue="m", retry_policy=never)
    await submit(stub, "fatal", queue="m")
    await submit(stub, "intr", queue="m")
    await submit(stub, "drop", queue="m", max_attempts=1)
    waiting = [await submit(stub, "nobody", queue="m") for _ in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await submit(stub, "ok", queue="m", priority=5000)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    worker = raw_workers()
    await worker.connect(
        "w1", credits=10, types=("ok", "fail", "fatal", "intr", "drop"), queues=("m",)
    )
    got = by_type(await worker.assignments(7))

    async def workers_busy() -> Page | None:
        p = await page(coordinator)
        return p if p.value("conveyor_workers_in_flight_tasks", tenant="default") == 7 else None

    busy = await eventually(workers_busy)
    assert busy.value("conveyor_workers_connected", tenant="default") == 1
    assert busy.value("conveyor_workers_credits", tenant="default") == 3

    # A heartbeat that renews a lease: a renewal flush.
    (fail,) = got["fail"]
    await worker.send(heartbeat=worker_service_pb2.Heartbeat(leases=[fail.lease]))
    await worker.receive_kind("heartbeat_ack")
    for ok in got["ok"]:
        assert (await worker.report(ok.lease)).accepted
    assert not (await worker.report(got["ok"][0].lease)).accepted
    assert (await worker.report(fail.lease, FAILED, error="again")).accepted
    (fatal,) = got["fatal"]
    assert (await worker.report(fatal.lease, FAILED, retryable=False)).accepted
    (intr,) = got["intr"]
    # Given back at once, so leased again: the new assignment and the ack may come in
    # either order.
    await worker.send(
        results=worker_service_pb2.Results(
            results=[worker_service_pb2.TaskResult(lease=intr.lease, outcome=INTERRUPTED)]
        )
    )
    seen: dict[str, Any] = {}
    while len(seen) < 2:
        message = await worker.receive()
        received = message.WhichOneof("message")
        if received in ("result_acks", "assignments"):
            seen[received] = getattr(message, received)
    assert seen["result_acks"].acks[0].accepted
    (again,) = seen["assignments"].assignments
    assert again.type == "intr" and again.lease.attempt == 2
    assert (await worker.report(again.lease)).accepted
    # "drop" is never reported and its lease never renewed: the reaper takes it back,
    # and, out of attempts, it is dead.
    await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=waiting[0].id))

    async def settled() -> Page | None:
        # The last transitions settle together: the expired lease's count, and no task
        # running on the worker (read from the database at scrape time). Read one page
        # only once both hold: on a loaded machine the first page to show the count
        # showed a task in flight once.
        p = await page(coordinator)
        expired = p.value("conveyor_tasks_lease_expired_total") == 1
        return (
            p
            if expired and p.value("conveyor_workers_in_flight_tasks", tenant="default") == 0
            else None
        )

    p = await eventually(settled, timeout=30)

    def count(name: str, **labels: str) -> float:
        return p.value(name, queue="m", tenant="default", **labels)

    assert count("conveyor_tasks_submitted_total") == 10
    assert count("conveyor_tasks_submitted_total", type="nobody") == 3
    assert count("conveyor_tasks_dispatched_total") == 8
    assert count("conveyor_tasks_succeeded_total") == 4
    assert count("conveyor_tasks_succeeded_total", type="intr") == 1
    assert count("conveyor_tasks_failed_total") == 2
    assert count("conveyor_tasks_retried_total", type="fail") == 1
    assert count("conveyor_tasks_dead_lettered_total") == 2  # fatal, and drop's expiry
    assert count("conveyor_tasks_dead_lettered_total", type="drop") == 1
    assert count("conveyor_tasks_lease_expired_total", type="drop") == 1
    assert count("conveyor_tasks_requeued_total", type="intr") == 1
    assert count("conveyor_tasks_cancelled_total", type="nobody") == 1
    assert p.value("conveyor_results_refused_total") == 1
    # Histograms: one observation per leased attempt, first lease, result, finished task.
    assert count("conveyor_task_queue_wait_seconds_count") == 8
    assert count("conveyor_task_pickup_latency_seconds_count") == 7
    assert count("conveyor_task_run_seconds_count") == 7
    assert count("conveyor_task_end_to_end_seconds_count") == 5
    assert count("conveyor_task_end_to_end_seconds_sum") > 0
    for kind in ("submit", "claim", "result", "renewal"):
        assert p.value("conveyor_group_commit_items_count", kind=kind) >= 1, kind
        assert p.value("conveyor_group_commit_flush_seconds_count", kind=kind) >= 1, kind
    assert p.value("conveyor_group_commit_items_sum", kind="submit") == 10
    rpc = "conveyor_rpc_duration_seconds_count"
    assert p.value(rpc, service=TASK_SERVICE, method="SubmitTask", code="OK") == 10
    assert p.value(rpc, service=TASK_SERVICE, method="SubmitTask", code="INVALID_ARGUMENT") == 1
    assert p.value(rpc, service=TASK_SERVICE, method="CancelTask", code="OK") == 1
    assert p.value("conveyor_worker_sessions_total", tenant="default") == 1
    assert p.value("conveyor_workers_in_flight_tasks", tenant="default") == 0

    async def depth() -> bool:
        d = await page(coordinator)
        got = {
            state: d.value("conveyor_queue_depth", queue="m", state=state)
            for state in ("pending", "scheduled", "running", "dead")
        }
        return got == {"pending": 2, "scheduled": 1, "running": 0, "dead": 2} and (
            d.value("conveyor_queue_oldest_pending_age_seconds", queue="m") > 0
        )

    await eventually(depth, timeout=15)  # depth is cached for a few seconds

    await worker.close()
    connect = {"service": "conveyor.v1.WorkerService", "method": "Connect"}

    async def stream_timed() -> bool:
        return (await page(coordinator)).value(rpc, **connect) == 1

    await eventually(stream_timed)


async def test_leadership_schedules_evictions_and_the_process(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    database_dsn: str,
) -> None:
    cluster = coordinator.config.cluster
    p = await page(coordinator)
    assert p.value("conveyor_leader", cluster=cluster) == 1
    assert p.value("conveyor_leader_epoch", cluster=cluster) == coordinator.epoch
    assert p.value("conveyor_leader_terms_total", cluster=cluster) == 1
    assert p.value("conveyor_fenced_writes_total", cluster=cluster) == 0
    assert p.has("conveyor_build_info", component="coordinator")
    assert p.has("process_resident_memory_bytes")

    # A schedule firing every second: firings and their lag.
    await stub.CreateSchedule(
        schedule_pb2.CreateScheduleRequest(
            schedule=schedule_pb2.Schedule(
                name="every-second",
                cron="* * * * * *",
                task_template=schedule_pb2.TaskTemplate(type="nobody", queue="s"),
            )
        )
    )

    async def fired() -> Page | None:
        got = await page(coordinator)
        return got if got.value("conveyor_schedule_firings_total", tenant="default") >= 2 else None

    p = await eventually(fired, timeout=15)
    assert p.value("conveyor_schedule_firing_lag_seconds_count", tenant="default") >= 2

    # Evictions: one worker falls silent; another's stream is replaced by its own process.
    silent = raw_workers()
    await silent.connect("silent", types=("x",), pulse=False)
    first = raw_workers()
    token = (await first.connect("twice", types=("x",))).resume_token
    second = raw_workers()
    await second.connect("twice", types=("x",), resume_token=token)

    async def evicted() -> Page | None:
        got = await page(coordinator)
        return got if got.value("conveyor_worker_evictions_total", reason="silent") == 1 else None

    p = await eventually(evicted, timeout=15)
    assert p.value("conveyor_worker_evictions_total", reason="replaced") == 1
    assert p.value("conveyor_worker_sessions_total", tenant="default") == 3

    # Another coordinator takes office on the same database: this one's next write (the
    # schedule firer writes every second) is refused by the fence, and it steps down.
    conn = await asyncpg.connect(database_dsn)
    try:
        newer = await leadership.take_office(conn, cluster, "usurper", "127.0.0.1:1")
    finally:
        await conn.close()
    assert newer == coordinator.epoch + 1

    async def fenced() -> Page | None:
        # Both: the refused write is counted a moment before the step-down is recorded,
        # and a scrape between the two saw the leader gauge still at 1 (CI, loaded).
        got = await page(coordinator)
        refused = got.value("conveyor_fenced_writes_total", cluster=cluster) >= 1
        return got if refused and got.value("conveyor_leader", cluster=cluster) == 0 else None

    p = await eventually(fenced, timeout=15)
    assert p.value("conveyor_leader_epoch", cluster=cluster) == newer - 1


async def test_without_metrics_listen_nothing_is_served_or_recorded(
    database_dsn: str,
) -> None:
    coord = Coordinator(coordinator_config(database_dsn))
    await coord.start()
    try:
        assert not coord.telemetry.metrics.enabled
        assert not hasattr(coord.telemetry.metrics, "registry")
        assert coord.telemetry.metrics_url == ""
        assert coord.deps is not None and coord.deps.metrics is coord.telemetry.metrics
        assert not coord.telemetry.interceptors()
    finally:
        await coord.stop(grace=1.0)


async def test_a_busy_metrics_port_fails_the_start_naming_it(database_dsn: str) -> None:
    first = Coordinator(coordinator_config(database_dsn, metrics_listen="127.0.0.1:0"))
    await first.start()
    try:
        taken = first.telemetry.server
        assert taken is not None
        second = Coordinator(
            coordinator_config(database_dsn, metrics_listen=f"127.0.0.1:{taken.port}")
        )
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{taken.port}"):
            await second.start()
    finally:
        await first.stop(grace=1.0)


async def test_the_etcd_session_and_leadership_follow_etcd(
    database_dsn: str, etcd_server: EtcdServer
) -> None:
    coord = Coordinator(
        coordinator_config(
            database_dsn,
            metrics_listen="127.0.0.1:0",
            etcd=tuple(etcd_server.endpoints),
            election_ttl=1.0,
        )
    )
    await coord.start()
    try:

        async def leading() -> Page | None:
            got = await page(coord)
            return got if got.value("conveyor_leader", cluster="default") == 1 else None

        p = await eventually(leading, timeout=15)
        assert p.value("conveyor_etcd_session_up", cluster="default") == 1
        etcd_server.pause()  # etcd stops answering: the lease cannot be renewed
        try:

            async def lost() -> Page | None:
                got = await page(coord)
                down = got.value("conveyor_etcd_session_up", cluster="default") == 0
                return got if down else None

            p = await eventually(lost, timeout=15)
            assert p.value("conveyor_leader", cluster="default") == 0
        finally:
            etcd_server.resume()
    finally:
        await coord.stop(grace=1.0)
