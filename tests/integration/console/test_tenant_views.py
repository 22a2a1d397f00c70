"""What one tenant's key sees of the workers (issue 20, breaks 4 and 5), through the same
API the console and the CLI use: `conveyor queues` lists a queue that only idle workers
serve, and `conveyor status` works with a tenant's own key, showing that tenant's workers
only; an admin key sees every tenant's, each with its tenant."""

from __future__ import annotations

import asyncio
import json

import pytest
from clitools import conveyor
from consoletools import Stack, Workers

from conveyor.worker import TaskContext

pytestmark = pytest.mark.slow


async def test_a_tenant_sees_its_own_workers_and_their_idle_queues(
    stack: Stack, workers: Workers
) -> None:
    for tenant, served in ((stack.acme, "idle-mail"), (stack.globex, "idle-billing")):
        worker = workers.make(tenant.worker, queues=[served], worker_id=f"{tenant.name}-1")

        @worker.task("noop")
        async def noop(ctx: TaskContext, payload: object) -> None:
            return None

        await workers.start(worker)

    async with stack.client(stack.acme.user.key) as acme:
        (queue,) = await acme.queues()  # no task anywhere: the worker's queue still shows
        assert (queue.name, queue.workers, queue.pending, queue.dead) == ("idle-mail", 1, 0, 0)
        (mine,) = await acme.workers()
        assert (mine.worker_id, mine.tenant, mine.queues) == ("acme-1", "acme", ("idle-mail",))
        assert mine.task_types == ("noop",)
    async with stack.client(stack.admin) as admin:
        everyone = {(w.tenant, w.worker_id) for w in await admin.workers()}
        assert everyone == {("acme", "acme-1"), ("globex", "globex-1")}

    key = ["--coordinator", stack.address, "--api-key", stack.acme.user.key]
    as_admin = ["--coordinator", stack.address, "--api-key", stack.admin]
    queues, status, everything = await asyncio.gather(
        conveyor("queues", "--json", *key), conveyor("status", *key), conveyor("status", *as_admin)
    )
    assert queues.code == 0, queues
    assert [q["name"] for q in json.loads(queues.out)] == ["idle-mail"]
    # Before, status needed the admin scope that the README never gave a user.
    assert status.code == 0, status
    assert "acme-1" in status.out and "idle-mail" in status.out and "noop" in status.out
    assert "globex" not in status.out and "idle-billing" not in status.out
    assert everything.code == 0 and "TENANT" in everything.out, everything
    assert "acme-1" in everything.out and "globex-1" in everything.out
