"""The plain claim runs on a connection of its own, planned once (a generic plan) with
the plan kinds that could read the whole table turned off (store/db.py, CLAIM_SETTINGS):
the dispatcher uses it, and its plan stays on the indexes whatever the statistics say."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import asyncpg
from testsupport import RawWorker, coordinator_config, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import Pool
from conveyor.coordinator.store.migrator import migrate
from conveyor.v1 import task_service_pb2_grpc

Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
Workers = Callable[[], RawWorker]

_CLAIMS = "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1"


async def test_dispatched_claims_run_on_the_claim_connection_with_one_plan(
    coordinator: Coordinator, stub: Stub, raw_workers: Workers
) -> None:
    worker = raw_workers()
    await worker.connect(credits=10)
    for _ in range(3):
        await submit(stub)
    assert len(await worker.assignments(3)) == 3
    assert coordinator.deps is not None
    pool = coordinator.deps.db.claim_pool
    assert pool is not None
    async with pool.acquire() as conn:
        plans = await conn.fetchrow(_CLAIMS, store._CLAIM.text)
        assert plans is not None, "the claim was not prepared on the claim connection"
        generic, custom = plans
        assert generic >= 1 and custom == 0
    # The main pool never runs it.
    async with coordinator.deps.db.read() as conn:
        assert await conn.fetchrow(_CLAIMS, store._CLAIM.text) is None


def _explain(epoch: int) -> str:
    """EXPLAIN of the prepared claim ``claim_plan`` for one queue, 70 tasks, any key."""
    return (
        "EXPLAIN (COSTS OFF) EXECUTE claim_plan('{q0}', 'default', '{t}', NULL, 70, "
        f"'default', {epoch}, 1000000000, 'w', '\\x68', {epoch}, 60)"
    )


async def _plan(conn: asyncpg.Connection, epoch: int) -> str:
    await conn.execute("PREPARE claim_plan AS " + store._CLAIM.text)
    try:
        return "\n".join(row[0] for row in await conn.fetch(_explain(epoch)))
    finally:
        await conn.execute("DEALLOCATE claim_plan")


async def test_the_claims_plan_stays_on_the_indexes_whatever_the_statistics(
    database_dsn: str,
) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await migrate(conn)
        epoch = await leadership.take_office(conn, "default", "test", "")
        assert epoch is not None
        # Statistics that make a plan made without the LIMIT's value read the table: many
        # ready rows, analyzed, and random reads priced high.
        await conn.execute(
            """
            INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state,
                priority, attempt, max_attempts, attempt_base, run_at, timeout_ms,
                retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, labels,
                traceparent, create_time, update_time)
            SELECT gen_random_uuid(), 'default', 'q' || (g % 3), 't', '\\x7b7d', '', 1, 0, 0,
                3, 0, now(), 60000, 1000, 60000, 2, 0.1, '{}', '', now(), now()
            FROM generate_series(1, 200000) g
            """
        )
        await conn.execute("ANALYZE tasks")
    finally:
        await conn.close()
    pools = Pool(coordinator_config(database_dsn))
    await pools.start()
    try:
        for pool in (pools.claims, pools.pool):
            async with pool.acquire() as c:
                await c.execute("SET random_page_cost = 40")
        async with pools.claims.acquire() as c:
            pinned = await _plan(c, epoch)
            await c.execute("RESET random_page_cost")
        # The control: the same generic plan without the pins reads the whole table.
        async with pools.pool.acquire() as c:
            await c.execute("SET plan_cache_mode = force_generic_plan")
            unpinned = await _plan(c, epoch)
            await c.execute("RESET plan_cache_mode; RESET random_page_cost")
    finally:
        await pools.stop()
    assert "Seq Scan on tasks" in unpinned, unpinned
    assert "Seq Scan on tasks" not in pinned, pinned
    assert "Hash Join" not in pinned and "Merge Join" not in pinned, pinned
    assert "Index Scan using tasks_ready on tasks" in pinned, pinned
    assert "Index Scan using tasks_pkey on tasks t" in pinned, pinned
