"""The CLI's observability, run as the real ``conveyor`` command: ``conveyor top``, and
``--metrics-listen`` on ``coordinator``, ``worker`` and ``dev`` (where metrics are off
unless asked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from clitools import conveyor, dev_data_dir, dev_process, remove_dev_data
from metrics_scrape import scrape
from processes import free_port
from testsupport import coordinator_config, eventually

from conveyor.cli.app import Globals
from conveyor.cli.top_command import Watcher
from conveyor.client import AsyncClient
from conveyor.coordinator import Coordinator
from conveyor.worker import TaskContext, Worker

WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture
async def coordinator(database_dsn: str) -> AsyncIterator[Coordinator]:
    coord = Coordinator(coordinator_config(database_dsn, metrics_listen="127.0.0.1:0"))
    await coord.start()
    try:
        yield coord
    finally:
        await coord.stop(grace=1.0)


def row(screen: str, first_cell: str) -> str:
    (line,) = [ln for ln in screen.splitlines() if ln.strip(" │┃|").startswith(first_cell)]
    return line


async def test_top_shows_leadership_queues_workers_and_rates(coordinator: Coordinator) -> None:
    worker = Worker(coordinator.address, queues=["mail"], concurrency=4, worker_id="top-worker")

    @worker.task("send")
    async def send(ctx: TaskContext, payload: Any) -> None:
        await ctx.cancelled.wait()  # holds its slot until the worker stops

    async with worker, AsyncClient(coordinator.address) as client:
        await asyncio.wait_for(worker.wait_connected(), 10)
        for _ in range(3):
            await client.submit("send", queue="mail")
        for _ in range(2):
            await client.submit("unserved", queue="mail")

        async def running() -> bool:
            queues = await client.queues()
            return [(q.name, q.pending, q.running) for q in queues] == [("mail", 2, 3)]

        await eventually(running)
        done = await conveyor(
            "top",
            "--iterations",
            "2",
            "--interval",
            "0.5",
            "--metrics",
            coordinator.telemetry.metrics_url,
            "--coordinator",
            coordinator.address,
            env=WIDE,
        )
    assert done.code == 0, done.err
    screen = done.out
    assert f"leader {coordinator.node_id} ({coordinator.address})" in screen
    assert f"epoch {coordinator.epoch}" in screen
    mail = row(screen, "mail")
    cells = mail.replace("│", " ").split()
    # QUEUE PENDING SCHEDULED RUNNING DEAD WORKERS OLDEST IN/S DONE/S FAILED/S
    assert cells[:6] == ["mail", "2", "0", "3", "0", "1"], mail
    assert cells[6].endswith("s") and cells[6] != "-", "the oldest pending task's age"
    assert all(c.endswith("/s") for c in cells[7:10]), "rates from two scrapes"
    top_worker = row(screen, "top-worker")
    assert "75%" in top_worker  # 3 of its 4 slots in use


async def test_top_without_metrics_and_without_a_cluster() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    done = await conveyor(
        "top", "--iterations", "1", "--coordinator", nowhere, "--rpc-timeout", "2", env=WIDE
    )
    assert done.code == 1
    assert "cannot read the cluster" in done.out
    assert "cluster unknown" in done.out and "NO LEADER" not in done.out


async def test_metrics_listen_is_checked_before_anything_starts(
    coordinator: Coordinator,
) -> None:
    bad = await conveyor("coordinator", "--dsn", "postgresql://x/y", "--metrics-listen", "9464")
    assert bad.code == 2
    assert "--metrics-listen" in bad.err and "is not HOST:PORT" in bad.err
    server = coordinator.telemetry.server
    assert server is not None
    busy = f"127.0.0.1:{server.port}"
    taken = await conveyor(
        "coordinator", "--dsn", "postgresql://x/y", "--listen", "127.0.0.1:0",
        "--metrics-listen", busy,
    )  # fmt: skip
    assert taken.code == 1
    assert taken.err == (
        f"conveyor: cannot serve metrics on {busy}: the address is in use; pick another "
        "with --metrics-listen HOST:PORT\n"
    )
    worker = await conveyor(
        "worker", "--demo", "--coordinator", coordinator.address, "--metrics-listen", busy
    )
    assert worker.code == 1 and "cannot serve metrics on" in worker.err
    nonsense = await conveyor("worker", "--demo", "--metrics-listen", "[::1")
    assert nonsense.code == 2 and "is not HOST:PORT" in nonsense.err


@pytest.mark.slow
async def test_dev_serves_metrics_only_when_asked() -> None:
    data_dir = dev_data_dir()
    address = f"127.0.0.1:{free_port()}"
    coordinator_metrics = f"127.0.0.1:{free_port()}"
    worker_metrics = f"127.0.0.1:{free_port()}"
    try:
        async with dev_process(
            data_dir,
            address,
            "--metrics-listen",
            coordinator_metrics,
            "--worker-metrics-listen",
            worker_metrics,
        ) as dev:
            banner = await dev.read_until("Press Ctrl-C")
            assert f"http://{coordinator_metrics}/metrics" in banner
            assert f"http://{worker_metrics}/metrics" in banner
            page = await scrape(f"http://{coordinator_metrics}/metrics")
            assert page.value("conveyor_leader", cluster="default") == 1

            async def worker_connected() -> bool:
                got = await scrape(f"http://{worker_metrics}/metrics")
                return got.value("conveyor_worker_connected") == 1

            await eventually(worker_connected, timeout=30)
            assert await dev.interrupt() == 0, dev.output()
        # Without the flags: nothing listens, and the banner says nothing of metrics.
        async with dev_process(data_dir, address) as dev:
            banner = await dev.read_until("Press Ctrl-C")
            assert "metrics" not in banner
            with pytest.raises(OSError):
                await scrape(f"http://{coordinator_metrics}/metrics")
            assert await dev.interrupt() == 0, dev.output()
    finally:
        remove_dev_data(data_dir)


async def test_top_keeps_the_last_picture_marked_when_the_cluster_goes_away(
    database_dsn: str,
) -> None:
    coord = Coordinator(coordinator_config(database_dsn))
    await coord.start()
    stopped = False
    try:
        async with AsyncClient(coord.address) as client:
            await client.submit("unserved", queue="q")
        watcher = Watcher(Globals(coordinator=coord.address, rpc_timeout=2.0), "")
        first = await watcher.snapshot()
        assert watcher.reached and not first.problem
        assert [(q.name, q.pending) for q in first.queues] == [("q", 1)]
        await coord.stop(grace=1.0)
        stopped = True
        second = await watcher.snapshot()
        assert not watcher.reached
        assert second.problem.startswith("cannot read the cluster")
        assert second.queues == first.queues and second.taken_at == first.taken_at
    finally:
        if not stopped:
            await coord.stop(grace=1.0)
