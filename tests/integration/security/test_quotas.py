"""Quotas per tenant, set with ``conveyor tenants set`` and enforced by a coordinator process:
backlog, submit rate, payload size and schedule count. Over a limit: RESOURCE_EXHAUSTED,
QUOTA_EXCEEDED, a QuotaFailure naming the limit, RetryInfo when waiting helps, nothing
written; another tenant is not affected. The client waits a rate limit out when asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from clitools import conveyor
from security import Key, Keys, running, secure_coordinator
from testsupport import ErrorDetails, error_details, eventually, leader_pool

from conveyor.client import AsyncClient, QuotaExceededError
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import schedule_pb2, task_service_pb2, task_service_pb2_grpc

pytestmark = pytest.mark.slow


async def _refusal(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    return details


async def test_tenant_limits(database_dsn: str, tmp_path: Path) -> None:
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        admin = ["--coordinator", coordinator.address, "--api-key", admin_key]
        keys = Keys(channel, admin_key)
        acme: Key = await keys.create("acme", "submit", "read")
        globex: Key = await keys.create("globex", "submit")
        done = await conveyor(
            "tenants", "set", "acme", "--max-backlog", "5", "--max-payload-bytes", "100",
            "--max-schedules", "1", "--json", *admin,
        )  # fmt: skip
        assert done.code == 0, done.err
        shown = json.loads(done.out)
        assert shown["limits"] == {
            "max_backlog": "5", "max_payload_bytes": "100", "max_schedules": "1"
        }  # fmt: skip
        stub = task_service_pb2_grpc.TaskServiceStub(channel)

        def submit(
            key: Key, count: int = 1, payload: bytes = b""
        ) -> Awaitable[task_service_pb2.SubmitTasksResponse]:
            request = task_service_pb2.SubmitTaskRequest(type="t", payload=payload)
            return stub.SubmitTasks(
                task_service_pb2.SubmitTasksRequest(tasks=[request] * count),
                metadata=key.metadata,
            )

        # The backlog: 5 for acme; globex has no limit and is not held back by acme's.
        await submit(acme, 5)
        details = await _refusal(submit(acme))
        assert details.quota_subjects == ["max_backlog"] and details.retry_after
        await submit(globex, 20)
        # The payload size: no RetryInfo, waiting does not help.
        await conveyor("tenants", "set", "acme", "--max-backlog", "0", *admin)
        details = await _refusal(submit(acme, 1, b"x" * 101))
        assert details.quota_subjects == ["max_payload_bytes"] and details.retry_after is None
        await submit(acme, 1, b"x" * 100)
        # The schedule count.
        create = schedule_pb2.CreateScheduleRequest(
            schedule=schedule_pb2.Schedule(
                name="one", cron="0 3 * * *", task_template=schedule_pb2.TaskTemplate(type="t")
            )
        )
        await stub.CreateSchedule(create, metadata=acme.metadata)
        create.schedule.name = "two"
        details = await _refusal(stub.CreateSchedule(create, metadata=acme.metadata))
        assert details.quota_subjects == ["max_schedules"]
        # The submit rate: a burst of 3, then 2 a second; a batch over the burst never fits.
        done = await conveyor(
            "tenants", "set", "acme", "--submit-rate", "2", "--submit-burst", "3", *admin
        )
        assert done.code == 0 and "submit_rate" in done.out, done.out
        await submit(acme, 3)
        details = await _refusal(submit(acme))
        assert details.quota_subjects == ["submit_rate"]
        assert details.retry_after is not None and 0 < details.retry_after <= 0.5
        details = await _refusal(submit(acme, 4))
        assert details.retry_after is None and "smaller batches" in details.message
        # The client waits the rate out per RetryInfo when asked to.
        async with AsyncClient(
            coordinator.address, api_key=acme.key, timeout=30, retry_resource_exhausted=True
        ) as client:
            for _ in range(3):
                await client.submit("t", None)
        async with AsyncClient(
            coordinator.address, api_key=acme.key, retry_resource_exhausted=False
        ) as client:
            with pytest.raises(QuotaExceededError) as caught:
                await client.submit("t", None)
            assert caught.value.violations[0][0] == "submit_rate"
        # What the tenants commands show.
        listed = await conveyor("tenants", "list", *admin)
        assert listed.code == 0, listed.err
        line = next(row for row in listed.out.splitlines() if row.startswith("acme "))
        assert line.split()[:5] == ["acme", "12", "none", "2", "3"], line
        got = await conveyor("tenants", "get", "globex", "--json", *admin)
        assert json.loads(got.out)["usage"]["backlog"] == "20"
    # Nothing refused was written: 5 + 1 + 3 + 3 for acme (and its one schedule).
    db = await asyncpg.connect(database_dsn)
    try:
        assert await db.fetchval("SELECT count(*) FROM tasks WHERE tenant = 'acme'") == 12
        assert await db.fetchval("SELECT count(*) FROM schedules WHERE tenant = 'acme'") == 1
    finally:
        await db.close()


async def test_the_schedule_count_sees_what_the_lock_holder_committed(database_dsn: str) -> None:
    """Two creations racing for a tenant's last free schedule: the second counts after the
    first commits (a count taken in the locking statement used an older snapshot)."""
    from conveyor.coordinator.store import tenants

    pool, _ = await leader_pool(database_dsn)
    try:
        async with pool.acquire() as first, pool.acquire() as second:
            holder = first.transaction()
            await holder.start()
            assert await tenants.lock_and_count_schedules(first, "race") == 0
            waiter = asyncio.create_task(_count_in_transaction(second, "race"))

            # The waiter is queued on the tenant's lock (PostgreSQL says so), not done.
            async def waiting() -> bool:
                return bool(
                    await first.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                )

            await eventually(waiting, timeout=10)
            await first.execute(
                "INSERT INTO schedules (id, tenant, name, cron, time_zone, template, "
                "overlap_policy, catch_up_policy, catch_up_limit, create_time, update_time) "
                "VALUES (gen_random_uuid(), 'race', 'one', '* * * * *', 'UTC', '', 1, 1, 0, "
                "now(), now())"
            )
            await holder.commit()
            assert await asyncio.wait_for(waiter, 10) == 1
    finally:
        await pool.close()


async def _count_in_transaction(conn: asyncpg.Connection, tenant: str) -> int:
    from conveyor.coordinator.store import tenants

    async with conn.transaction():
        return await tenants.lock_and_count_schedules(conn, tenant)
