"""The suspicion of issue 15, decided: "right after a limit is first set, or after a
failover, the backlog count is empty for up to a second (over-admission)". It was real:
the count is taken only while some tenant has a backlog limit, and a new term starts
with none, so for up to ``backlog_refresh`` the estimate knew nothing of the tasks
already there and admitted submits past the limit. Now a limited tenant's submit waits
for the count (which starts at once) instead."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from testsupport import coordinator_config, error_details, leader_pool, service_deps

from conveyor.coordinator import Coordinator
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.tenancy.backlog import BacklogCounter
from conveyor.coordinator.tenancy.directory import Directory
from conveyor.coordinator.tenancy.quotas import Quotas
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    auth_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)

pytestmark = pytest.mark.slow

BACKLOG = 20
LIMIT = 10
# Tasks already there when the limit starts to count (written before it, or before the
# coordinator took office).
_PLANT = f"""
    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
        max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms, retry_multiplier,
        retry_jitter, create_time, update_time)
    SELECT gen_random_uuid(), $1, 'q', 't', '', 'application/json', 1, 0, 3, now(), 1000,
        1000, 1000, 2, 0, now(), now()
    FROM generate_series(1, {BACKLOG})
"""


async def test_a_first_backlog_limit_counts_the_tasks_already_there(database_dsn: str) -> None:
    # A refresh long enough that only a count the limit itself starts can see the backlog.
    coordinator = Coordinator(coordinator_config(database_dsn, backlog_refresh=60.0))
    await coordinator.start()
    try:
        db = await asyncpg.connect(database_dsn)
        try:
            await db.execute(_PLANT, "default")
        finally:
            await db.close()
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            await admin.UpdateTenantLimits(
                admin_service_pb2.UpdateTenantLimitsRequest(
                    tenant="default", limits=auth_pb2.TenantLimits(max_backlog=LIMIT)
                )
            )
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tasks.SubmitTask(task_service_pb2.SubmitTaskRequest(type="t"))
        details = error_details(caught.value)
        assert details.quota_subjects == ["max_backlog"], details
        assert f"about {BACKLOG} unfinished tasks" in details.message
    finally:
        await coordinator.stop(grace=1.0)


async def test_a_new_term_counts_before_it_admits(database_dsn: str) -> None:
    """A leader that has just taken office (a failover) starts its backlog counter; the
    first submit of a limited tenant is decided against that count, not an empty one.
    The services as the coordinator runs them, on a real PostgreSQL, so the moment
    between taking office and the first count is exact."""
    pool, epoch = await leader_pool(database_dsn)
    try:
        async with pool.acquire() as conn:
            await conn.execute(_PLANT, "acme")
            await conn.execute("INSERT INTO tenants (name, max_backlog) VALUES ('acme', $1)", LIMIT)
        deps = service_deps(pool, database_dsn, epoch=epoch)
        directory = Directory(deps.db, database_dsn, refresh=60.0)
        await directory.reload_all()
        counter = BacklogCounter(deps)
        quotas = Quotas(deps.config, directory, counter)
        counter.start()  # as taking office does
        try:
            with pytest.raises(QuotaExceeded) as caught:
                async with quotas.admission("acme", [task_service_pb2.SubmitTaskRequest()]):
                    pass
            assert caught.value.subject == "max_backlog"
            assert counter.counted == {"acme": BACKLOG}
        finally:
            await counter.stop()
    finally:
        await pool.close()
