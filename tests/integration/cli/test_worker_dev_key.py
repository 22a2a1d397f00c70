"""A worker that found ``conveyor dev``'s key by itself (no ``CONVEYOR_API_KEY``) uses it for
its handlers' calls too: ``ctx.ledger`` and ``ctx.lock`` used to fail with "no API key"
while its stream, which looked the key up, worked.

A real coordinator that requires keys, a folder holding a live dev's ``.conveyor/dev``
(its key and lock file, naming this coordinator's address) and a real ``conveyor worker``
process started there without a key.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from processes import Command
from security import running, secure_coordinator

from conveyor.client import AsyncClient
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.transport._devkey import DEV_DATA_DIR

pytestmark = pytest.mark.slow

TASKS = """\
from conveyor.worker import TaskContext, Worker

worker = Worker("{address}")


@worker.task("charge")
async def charge(ctx: TaskContext, order: dict[str, int]) -> object:
    done = await ctx.ledger.get("charge")
    if done is not None:
        return done.result
    async with ctx.lock("account-1", ttl=30):
        receipt = {{"charged": order["cents"]}}
        await ctx.ledger.record("charge", receipt)
    return receipt
"""


async def test_handler_calls_use_the_dev_key_the_worker_found(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    async with running(secure_coordinator(database_dsn, tmp_path, admin_key)) as coordinator:
        address = coordinator.address
        folder = tmp_path / "clone"
        dev = folder / DEV_DATA_DIR
        dev.mkdir(parents=True)
        (dev / "admin.key").write_text(admin_key + "\n")
        # A live dev listening on the coordinator's address (this process stands in for it).
        (dev / "dev.lock").write_text(f"{os.getpid()}\n{address}\n")
        (folder / "myapp").mkdir()
        (folder / "myapp" / "__init__.py").write_text("")
        (folder / "myapp" / "tasks.py").write_text(TASKS.format(address=address))
        env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_API_KEY"}
        worker = Command(
            "worker",
            [
                sys.executable,
                "-m",
                "conveyor.cli.main",
                "worker",
                "myapp.tasks",
                "--coordinator",
                address,
            ],
            tmp_path,
            env,
            cwd=folder,
            inherit_env=False,
        ).start()
        try:
            async with AsyncClient(address, api_key=admin_key, timeout=10) as client:
                task = await client.submit("charge", {"cents": 250}, max_attempts=1)
                done = await client.wait(task.id, timeout=60)
            log = worker.output()
            assert "using conveyor dev's API key from" in log, log
            assert done.state.name == "SUCCEEDED", (done.last_error, log)
            assert json.loads(done.result or b"") == {"charged": 250}
        finally:
            worker.close()
