"""A real Prometheus server scrapes a coordinator process and a worker process (each
started by ``conveyor ... --metrics-listen``), and its query API returns what the test
did: the queue depth the database holds and the tasks that succeeded. It also loads the
alert rules, and accepts every expression of the alerts and the dashboard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cluster import CoordinatorProcess, WorkerProcess
from deploy_files import alert_exprs, alert_rules, dashboard_exprs, prometheus_tool
from processes import free_ports
from prometheus_server import PrometheusServer
from testsupport import eventually

from conveyor.client import AsyncClient, TaskState

QUEUE = "obs"
PENDING, RUNNING, SUCCEEDED = 1, 3, 4


@pytest.fixture
def processes(
    database_dsn: str, tmp_path: Path
) -> Iterator[tuple[CoordinatorProcess, WorkerProcess]]:
    prometheus_tool("prometheus")  # skips, saying how to get it, before anything starts
    coordinator_port, worker_port = free_ports(2)
    coordinator = CoordinatorProcess(
        database_dsn,
        None,
        log_dir=tmp_path,
        cluster="obs-test",
        extra_args=["--metrics-listen", f"127.0.0.1:{coordinator_port}"],
    )
    worker = WorkerProcess(
        coordinator.address,
        tmp_path / "effects.log",
        log_dir=tmp_path,
        queues=[QUEUE],
        extra_args=["--metrics-listen", f"127.0.0.1:{worker_port}"],
    )
    try:
        yield coordinator, worker
    finally:
        worker.close()
        coordinator.close()


async def value(prom: PrometheusServer, expr: str) -> float | None:
    result = await prom.aquery(expr)
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_sees_queue_depth_and_succeeded_counts(
    processes: tuple[CoordinatorProcess, WorkerProcess], database_dsn: str, tmp_path: Path
) -> None:
    coordinator, worker = processes
    coordinator.start()
    await coordinator.wait_serving()
    worker.start()
    metrics = {
        "conveyor-coordinator": [f"http://{_flag(coordinator.extra_args)}/metrics"],
        "conveyor-worker": [f"http://{_flag(worker.extra_args)}/metrics"],
    }
    async with AsyncClient(coordinator.address) as client:
        done = [await client.submit("noop", queue=QUEUE) for _ in range(5)]
        for _ in range(4):  # nobody serves this type: they wait
            await client.submit("nobody", queue=QUEUE)
        for task in done:
            assert (await client.wait(task.id, timeout=60)).state is TaskState.SUCCEEDED

        db = await asyncpg.connect(database_dsn)
        try:

            async def truth(state: int) -> int:
                return int(
                    await db.fetchval(
                        "SELECT count(*) FROM tasks WHERE queue = $1 AND state = $2", QUEUE, state
                    )
                )

            assert (await truth(PENDING), await truth(RUNNING), await truth(SUCCEEDED)) == (4, 0, 5)
        finally:
            await db.close()

        with PrometheusServer(metrics, tmp_path) as prom:
            await eventually(prom.aready, timeout=60)

            async def depth_is(state: str, expected: int) -> bool:
                got = await value(prom, f'conveyor_queue_depth{{queue="{QUEUE}",state="{state}"}}')
                return got == expected

            await eventually(lambda: depth_is("pending", 4), timeout=30)
            assert await depth_is("running", 0)

            async def succeeded() -> bool:
                counts = (
                    await value(prom, f'sum(conveyor_tasks_succeeded_total{{queue="{QUEUE}"}})'),
                    await value(
                        prom,
                        f'sum(conveyor_worker_executions_total{{queue="{QUEUE}",'
                        'outcome="succeeded"})',
                    ),
                )
                return counts == (5.0, 5.0)

            await eventually(succeeded, timeout=30)
            assert await value(prom, "sum(up)") == 2
            assert await value(prom, 'conveyor_leader{cluster="obs-test"}') == 1
            assert await value(prom, "sum(conveyor_workers_connected)") == 1
            assert await value(prom, "sum(conveyor_worker_connected)") == 1

            # Depth is read at scrape time: more submits show up by themselves.
            for _ in range(2):
                await client.submit("nobody", queue=QUEUE)
            await eventually(lambda: depth_is("pending", 6), timeout=30)
            age = await value(prom, f'conveyor_queue_oldest_pending_age_seconds{{queue="{QUEUE}"}}')
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


def _flag(args: tuple[str, ...]) -> str:
    return args[args.index("--metrics-listen") + 1]
