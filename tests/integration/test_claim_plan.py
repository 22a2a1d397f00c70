"""The plain claim runs on a connection of its own, planned once (a generic plan) with
the plan kinds that could read the whole table turned off (store/db.py, CLAIM_SETTINGS):
the dispatcher uses it, and its plan stays on the indexes whatever the statistics say."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import asyncpg
import pytest
from testsupport import RawWorker, coordinator_config, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import Pool
from conveyor.coordinator.store.migrator import migrate
from conveyor.v1 import task_service_pb2_grpc

Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
Workers = Callable[[], RawWorker]

_PLANS = "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1"


async def _plans(pool: asyncpg.Pool, text: str) -> list[tuple[int, int]]:
    """(generic, custom) plans made for ``text`` on each connection of ``pool``."""
    held = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        return [tuple(row) for c in held for row in await c.fetch(_PLANS, text)]
    finally:
        for c in held:
            await pool.release(c)


async def test_dispatched_claims_run_on_the_claim_connection_with_one_plan(
    coordinator: Coordinator, stub: Stub, raw_workers: Workers
) -> None:
    worker = raw_workers()
    await worker.connect(credits=10)
    for _ in range(3):
        await submit(stub)
    assert len(await worker.assignments(3)) == 3
    assert coordinator.deps is not None
    db = coordinator.deps.db
    assert db.claim_pool is not None
    async with db.claim_pool.acquire() as conn:
        plans = await conn.fetchrow(_PLANS, store._CLAIM.text)
        assert plans is not None, "the claim was not prepared on the claim connection"
        generic, custom = plans
        assert generic >= 1 and custom == 0
    # The main pool never runs it.
    held = [await db.pool.acquire() for _ in range(db.pool.get_size())]
    try:
        for conn in held:
            assert await conn.fetchrow(_PLANS, store._CLAIM.text) is None
    finally:
        for conn in held:
            await db.pool.release(conn)


def _claim(epoch: int) -> str:
    """The claim's arguments for one queue, 70 tasks, any key."""
    return (
        f"'{{q0}}', 'default', '{{t}}', NULL, 70, 'default', {epoch}, 1000000000, 'w', "
        f"'\\x68', {epoch}, 60"
    )


async def _plan(conn: asyncpg.Connection, text: str, args: str) -> str:
    await conn.execute("PREPARE planned AS " + text)
    try:
        rows = await conn.fetch(f"EXPLAIN (COSTS OFF) EXECUTE planned({args})")
        return "\n".join(row[0] for row in rows)
    finally:
        await conn.execute("DEALLOCATE planned")


_INSERT_READY = """
    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
        attempt, max_attempts, attempt_base, run_at, timeout_ms, retry_initial_ms,
        retry_max_ms, retry_multiplier, retry_jitter, labels, traceparent, create_time,
        update_time)
    SELECT gen_random_uuid(), 'default', 'q' || (g % 3), 't', '\\x7b7d', '', 1, 0, 0, 3, 0,
        now(), 60000, 1000, 60000, 2, 0.1, '{}', '', now(), now()
    FROM generate_series(1, $1::int) g
"""


@pytest.mark.parametrize("statistics", ["deep", "emptied", "fresh"])
async def test_the_claims_plan_stays_on_the_indexes_whatever_the_statistics(
    database_dsn: str, statistics: str
) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await migrate(conn)
        epoch = await leadership.take_office(conn, "default", "test", "")
        assert epoch is not None
        # Statistics that make a plan made without the LIMIT's value read the table:
        # many ready rows, analyzed, random reads priced high ("deep"); or a table that
        # was emptied and vacuumed, so every scan of it looks free ("emptied").
        # Or a few rows never analyzed, as at a first start ("fresh").
        rows = {"deep": 200_000, "emptied": 20_000, "fresh": 50}[statistics]
        await conn.execute(_INSERT_READY, rows)
        if statistics == "emptied":
            await conn.execute("DELETE FROM tasks")
            await conn.execute("VACUUM ANALYZE tasks")
        elif statistics == "deep":
            # Many webhook subscriptions too (of other tenants): the outbox's join must
            # still go from the claimed rows to the subscriptions' index.
            await conn.execute(
                "INSERT INTO webhook_subscriptions (id, tenant, url, secret) "
                "SELECT gen_random_uuid(), 'tenant-' || g, 'https://example.com', 's' "
                "FROM generate_series(1, 20000) g"
            )
            await conn.execute("ANALYZE")
    finally:
        await conn.close()
    pools = Pool(coordinator_config(database_dsn))
    await pools.start()
    try:
        async with pools.claims.acquire() as c:
            await c.execute("SET random_page_cost = 40")
            pinned = await _plan(c, store._CLAIM.text, _claim(epoch))
            await c.execute("RESET random_page_cost")
    finally:
        await pools.stop()
    # (Written as a join, `FROM picked WHERE t.id = picked.id`, this plan walked the whole
    # primary key per claim with the "emptied" statistics, and hashed a sequential scan
    # of tasks without the settings with the "deep" ones.)
    assert "Seq Scan" not in pinned, pinned
    assert "Hash" not in pinned and "Merge" not in pinned, pinned
    # Per queue the head of the ready index; per claimed row its primary key entry.
    assert "Index Scan using tasks_ready on tasks" in pinned, pinned
    assert "Index Scan using tasks_pkey on tasks t" in pinned, pinned
    assert "Index Cond: (id = ANY ((InitPlan" in pinned, pinned
    assert "Index Scan using webhook_subscriptions_tenant" in pinned, pinned
