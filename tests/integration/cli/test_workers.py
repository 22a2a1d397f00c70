"""What the CLI shows about workers: `conveyor worker --grace-period`, and tasks that no
connected worker serves (`get`, `submit --wait`, `queues`, `status`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from clitools import CLI, conveyor
from testsupport import eventually

from conveyor.coordinator import Coordinator


async def _start_worker(address: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI, "worker", *args, "--coordinator", address, "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


async def _task(address: str, task_id: str) -> dict[str, object]:
    done = await conveyor("get", task_id, "--json", "--coordinator", address)
    assert done.code == 0, done.err
    shown: dict[str, object] = json.loads(done.out)
    return shown


async def test_worker_grace_period(coordinator: Coordinator) -> None:
    """SIGTERM drains: a task still running when --grace-period ends is given up, and the
    worker exits 0 then, not after the default 30 s."""
    address = coordinator.address
    worker = await _start_worker(address, "--demo", "--grace-period", "1")
    try:
        task_id = (await conveyor("submit", "sleep", "60", "--coordinator", address)).out.strip()

        async def running() -> bool:
            return (await _task(address, task_id))["state"] == "RUNNING"

        await eventually(running, timeout=30)
        worker.send_signal(signal.SIGTERM)
        # 1 s of grace plus the drain; far below the 30 s default.
        assert await asyncio.wait_for(worker.wait(), 15) == 0
        assert (await _task(address, task_id))["state"] != "RUNNING"
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def test_unserved_task_is_shown(coordinator: Coordinator) -> None:
    address = coordinator.address
    where = ["--coordinator", address]
    task_id = (await conveyor("submit", "send-email", "--queue", "mail", *where)).out.strip()
    done = await conveyor("get", task_id, *where)
    assert "no connected worker serves type 'send-email' on queue 'mail'" in done.out
    done = await conveyor("submit", "send-email", "--queue", "mail", "--wait-timeout", "3", *where)
    assert done.code == 1
    assert "note: no connected worker serves type 'send-email' on queue 'mail'" in done.err
    assert "no connected worker serves" in done.err.splitlines()[-1]


async def test_queues_and_status_show_the_workers(coordinator: Coordinator) -> None:
    address = coordinator.address
    worker = await _start_worker(address, "--demo")
    try:
        # A task that waits keeps the queue listed.
        await conveyor("submit", "echo", "--delay", "3600", "--coordinator", address)

        async def workers_on_default() -> int:
            done = await conveyor("queues", "--json", "--coordinator", address)
            (default,) = [q for q in json.loads(done.out) if q["name"] == "default"]
            return int(default["workers"])

        assert await eventually(workers_on_default, timeout=30) == 1
        done = await conveyor("status", "--coordinator", address)
        assert "echo,sleep,fail" in done.out
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
