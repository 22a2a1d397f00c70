"""What the CLI shows about workers: `conveyor worker --grace-period`, and tasks that no
connected worker serves (`get`, `submit --wait`, `queues`, `status`)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from clitools import CLI, conveyor
from processes import Command
from testsupport import eventually

from conveyor.coordinator import Coordinator


def _start_worker(address: str, log_dir: Path, *args: str) -> Command:
    return Command(
        "worker",
        [*CLI, "worker", *args, "--coordinator", address, "--log-level", "warning"],
        log_dir,
    ).start()


async def _task(address: str, task_id: str) -> dict[str, object]:
    done = await conveyor("get", task_id, "--json", "--coordinator", address)
    assert done.code == 0, done.err
    shown: dict[str, object] = json.loads(done.out)
    return shown


async def test_worker_grace_period(coordinator: Coordinator, tmp_path: Path) -> None:
    """SIGTERM drains: a task still running when --grace-period ends is given up, and the
    worker exits 0 then, not after the default 30 s."""
    address = coordinator.address
    worker = _start_worker(address, tmp_path, "--demo", "--grace-period", "1")
    try:
        task_id = (await conveyor("submit", "sleep", "60", "--coordinator", address)).out.strip()

        async def running() -> bool:
            return (await _task(address, task_id))["state"] == "RUNNING"

        await eventually(running, timeout=30)
        worker.signal(signal.SIGTERM)
        # 1 s of grace plus the drain; far below the 30 s default.
        assert await worker.wait_exit(15) == 0, worker.output()
        assert (await _task(address, task_id))["state"] != "RUNNING"
    finally:
        worker.close()


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


async def test_queues_and_status_show_the_workers(coordinator: Coordinator, tmp_path: Path) -> None:
    address = coordinator.address
    worker = _start_worker(address, tmp_path, "--demo")
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
        # Issue 20, first hour: the dead tasks' list says why each died.
        where = ["--coordinator", address]
        dead = await conveyor("submit", "fail", "--max-attempts", "1", "--wait", *where)
        assert dead.code == 1, dead
        done = await conveyor("tasks", "--state", "dead", *where)
        header, row = done.out.splitlines()[:2]
        assert header.split()[-2:] == ["LAST", "ERROR"], done.out
        assert row.endswith("DemoFailure: demo failure"), done.out
    finally:
        await worker.stop(30)
