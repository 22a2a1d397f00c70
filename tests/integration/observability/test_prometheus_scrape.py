"""A real Prometheus server scrapes a coordinator's and a worker's metrics endpoints and
its query API returns what the test did: queue depth read from the real database at
scrape time, and the succeeded counters. It also loads the alert rules, and accepts every
expression of the alerts and the dashboard.

Phase A: the registries here are fed by the test (the depth query runs against the
database of a real coordinator that ran the tasks; the counters are recorded from the
rows the coordinator wrote). Once the coordinator and worker export their own registries
(phase B), this test points Prometheus at them instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from deploy_files import alert_exprs, alert_rules, dashboard_exprs
from prometheus_server import PrometheusServer
from testsupport import RawWorker, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.observability.metrics import (
    CoordinatorMetrics,
    MetricsServer,
    QueueDepth,
    WorkerMetrics,
    WorkerProcessState,
)
from conveyor.v1 import task_service_pb2_grpc

# The grouped query phase B adds to coordinator/store/tasks.py (one statement per scrape,
# at most once per max_age): states as stored (1 PENDING, 2 SCHEDULED, 3 RUNNING, 5 DEAD).
QUEUE_DEPTH_SQL = """
    SELECT tenant, queue,
        count(*) FILTER (WHERE state = 1) AS pending,
        count(*) FILTER (WHERE state = 2) AS scheduled,
        count(*) FILTER (WHERE state = 3) AS running,
        count(*) FILTER (WHERE state = 5) AS dead,
        extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 1))::float8
            AS oldest_pending_age_seconds
    FROM tasks
    WHERE state IN (1, 2, 3, 5)
    GROUP BY tenant, queue
"""
SUCCEEDED = 4


@pytest.fixture
async def pool(database_dsn: str, coordinator: Coordinator) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_dsn, min_size=1, max_size=2) as pool:
        yield pool


async def value(prom: PrometheusServer, expr: str) -> float | None:
    result = await prom.aquery(expr)
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_sees_queue_depth_and_succeeded_counts(
    coordinator: Coordinator,
    pool: asyncpg.Pool,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    tmp_path: Path,
) -> None:
    for _ in range(7):
        await submit(stub, "obs-echo", queue="obs")
    worker = raw_workers()
    await worker.connect("obs-worker", credits=3, types=("obs-echo",), queues=("obs",))
    for assignment in await worker.assignments(3):
        ack = await worker.report(assignment.lease)
        assert ack.accepted

    async def fetch() -> list[QueueDepth]:
        rows = await pool.fetch(QUEUE_DEPTH_SQL)
        return [QueueDepth(**dict(r)) for r in rows]

    coordinator_metrics = CoordinatorMetrics(cluster="obs-test")
    coordinator_metrics.watch_queue_depth(fetch, loop=asyncio.get_running_loop(), max_age=0.5)
    succeeded = await pool.fetch(
        "SELECT tenant, queue, type, state, NULL::float8 AS run_seconds,"
        " extract(epoch FROM finish_time - create_time)::float8 AS end_to_end_seconds"
        " FROM tasks WHERE state = $1",
        SUCCEEDED,
    )
    coordinator_metrics.record_results(succeeded)
    coordinator_metrics.took_office(coordinator.epoch)
    worker_metrics = WorkerMetrics()
    worker_metrics.record_executions([("obs", "obs-echo", "succeeded", 0.01)] * len(succeeded))
    worker_metrics.watch_process(lambda: WorkerProcessState(3, 0, True))

    servers = [
        MetricsServer(coordinator_metrics.registry, "127.0.0.1:0"),
        MetricsServer(worker_metrics.registry, "127.0.0.1:0"),
    ]
    for server in servers:
        server.start()
    try:
        targets = {"conveyor-coordinator": [servers[0].url], "conveyor-worker": [servers[1].url]}
        with PrometheusServer(targets, tmp_path) as prom:
            await eventually(prom.aready, timeout=60)

            async def truth(state: int) -> int:
                return int(
                    await pool.fetchval(
                        "SELECT count(*) FROM tasks WHERE queue = 'obs' AND state = $1", state
                    )
                )

            assert (await truth(1), await truth(3), await truth(SUCCEEDED)) == (4, 0, 3)

            async def depth_is(state: str, expected: int) -> bool:
                got = await value(prom, f'conveyor_queue_depth{{queue="obs",state="{state}"}}')
                return got == expected

            await eventually(lambda: depth_is("pending", 4), timeout=30)
            assert await depth_is("running", 0)

            async def succeeded_counts() -> tuple[float | None, float | None]:
                return (
                    await value(prom, 'sum(conveyor_tasks_succeeded_total{queue="obs"})'),
                    await value(
                        prom,
                        'sum(conveyor_worker_executions_total{queue="obs",outcome="succeeded"})',
                    ),
                )

            async def counted() -> bool:
                return await succeeded_counts() == (3.0, 3.0)

            await eventually(counted, timeout=30)
            assert await value(prom, "sum(up)") == 2
            assert await value(prom, 'conveyor_leader{cluster="obs-test"}') == 1

            # Depth is read at scrape time: more submits show up without recording.
            for _ in range(2):
                await submit(stub, "obs-echo", queue="obs")
            await eventually(lambda: depth_is("pending", 6), timeout=30)
            age = await value(prom, 'conveyor_queue_oldest_pending_age_seconds{queue="obs"}')
            assert age is not None and age > 0

            # The alert rules load and evaluate in a real server...
            async def rules_evaluated() -> list[dict[str, object]] | None:
                groups = (await prom.aget("/api/v1/rules"))["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return rules if rules and all(r.get("lastEvaluation") for r in rules) else None

            loaded = await eventually(rules_evaluated, timeout=30)
            assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
            assert all(r["health"] == "ok" for r in loaded), loaded
            # ...and it accepts every expression of the alerts and the dashboard.
            for where, expr in {**alert_exprs(), **dashboard_exprs()}.items():
                try:
                    await prom.aquery(expr)
                except Exception as exc:
                    raise AssertionError(f"{where}: {expr}: {exc}") from None
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
