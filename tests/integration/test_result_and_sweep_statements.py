"""What PostgreSQL does for results and the leader's sweeps (docs/performance.md, issue 19,
fifth round): the result statement finds its tasks by the primary key whatever the
statistics say; a sweep with nothing to do runs no write, and a deposed leader's sweep is
still refused by its fence; the result connections are planned before the first result."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import asyncpg
import pytest
from testsupport import RawWorker, coordinator_config, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import RESULT_CONNECTIONS, Pool
from conveyor.coordinator.store.sql import Fence, Query
from conveyor.v1 import task_service_pb2_grpc

Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"

_INSERT_READY = """
    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
        attempt, max_attempts, attempt_base, run_at, timeout_ms, retry_initial_ms,
        retry_max_ms, retry_multiplier, retry_jitter, labels, traceparent, create_time,
        update_time)
    SELECT gen_random_uuid(), 'default', 'q', 't', '\\x7b7d', '', 1, 0, 0, 3, 0,
        now(), 60000, 1000, 60000, 2, 0.1, '{}', '', now(), now()
    FROM generate_series(1, $1::int) g
"""

_PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1"


async def _fence(conn: asyncpg.Connection) -> Fence:
    epoch = await leadership.take_office(conn, "default", "test", "")
    assert epoch is not None
    return Fence("default", epoch)


async def _claim(
    conn: asyncpg.Connection, fence: Fence, limit: int, lease: float = 60
) -> list[str]:
    rows = await store.claim(
        conn,
        tenant="default",
        queues=["q"],
        types=["t"],
        keys=None,
        limit=limit,
        max_bytes=1 << 30,
        worker_id="w",
        holder=b"h",
        lease_seconds=lease,
        fence=fence,
    )
    return [row["id"] for row in rows]


async def _running(
    conn: asyncpg.Connection, fence: Fence, *, tasks: int, results: int
) -> list[store.Outcome]:
    """Inserts ``tasks`` ready tasks, takes statistics (of a moment when nothing ran, as a
    queue table's always are), claims 1,000 and returns successes for ``results`` of them."""
    await conn.execute(_INSERT_READY, tasks)
    await conn.execute("ANALYZE tasks")
    ids = await _claim(conn, fence, 1000)
    assert len(ids) == 1000
    return [
        store.Outcome(
            LeaseKey("default", i, 1, fence.epoch, "w"), store.OUTCOME_SUCCEEDED, b"", "", False
        )
        for i in ids[:results]
    ]


async def _plan(
    conn: asyncpg.Connection, query: Query, fence: Fence, outcomes: list[store.Outcome]
) -> str:
    args = query.args({"fence": fence, **store._outcome_arrays(outcomes)})
    return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query.text, *args))


async def test_the_result_statement_reads_the_results_tasks_not_every_running_one(
    conn: asyncpg.Connection,
) -> None:
    fence = await _fence(conn)
    outcomes = await _running(conn, fence, tasks=1000, results=50)
    for query in (store._FINISH_PLAIN, store._FINISH):
        plan = await _plan(conn, query, fence, outcomes)
        # (With `t.state = 3`, the plan read all 1,000 RUNNING tasks by tasks_leased.)
        assert "tasks_leased" not in plan, plan
        assert "Seq Scan on tasks" not in plan, plan
        assert "Index Scan on tasks_pkey" in plan or "using tasks_pkey on tasks t" in plan, plan
    # And it applies them.
    rows = await store.finish_attempts_plain(conn, outcomes, fence)
    assert len(rows) == 50
    assert await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 4") == 50
    assert await conn.fetchval("SELECT count(*) FROM task_attempts") == 50


async def test_a_full_flush_joins_its_results_to_their_tasks_in_linear_time(
    conn: asyncpg.Connection,
) -> None:
    fence = await _fence(conn)
    # Large enough that the planner reads the flush's tasks by an index scan of their
    # own (a small table gets a bitmap scan and a hash join either way).
    outcomes = await _running(conn, fence, tasks=100_000, results=500)
    for query in (store._FINISH_PLAIN, store._FINISH):
        plan = await _plan(conn, query, fence, outcomes)
        # With `t.state + 0 = 3` the planner expected 2 of the 500 tasks and joined the
        # results to them in a nested loop over the scan materialized: 500 x 500
        # comparisons per flush (20-90 ms with 10,000,000 tasks waiting).
        assert "Materialize" not in plan, plan
        assert "Merge Join" in plan or "Hash Join" in plan, plan


async def test_a_sweep_with_nothing_to_do_writes_nothing(conn: asyncpg.Connection) -> None:
    fence = await _fence(conn)
    await conn.execute(_INSERT_READY, 3)
    assert len(await _claim(conn, fence, 3)) == 3  # running, leases not expired
    await conn.execute(
        "INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,"
        " max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms, retry_multiplier,"
        " retry_jitter, create_time, update_time, deadline) VALUES (gen_random_uuid(),"
        " 'default', 'q', 't', '', '', 2, 0, 3, now() + interval '1 hour', 1000, 1000, 1000,"
        " 2, 0, now(), now(), now() + interval '1 hour')"
    )
    assert await store.reap_expired(conn, 100, fence) == []
    assert await store.promote_due(conn, 100, fence) == []
    assert await store.expire_deadlines(conn, 100, fence) == []
    # None of the sweeps' statements ran (asyncpg prepares each statement it runs).
    for query in (store._REAP, store._PROMOTE, store._EXPIRE_DEADLINES):
        assert await conn.fetchval(_PREPARED, query.text) == 0, query.name


async def test_a_sweep_with_work_runs_it(conn: asyncpg.Connection) -> None:
    fence = await _fence(conn)
    await conn.execute(_INSERT_READY, 2)
    assert len(await _claim(conn, fence, 2, lease=0)) == 2  # expired at once
    await conn.execute(
        "UPDATE tasks SET state = 2, run_at = now() - interval '1 second', deadline = NULL"
        " WHERE state = 1"
    )
    await conn.execute(_INSERT_READY, 1)
    await conn.execute("UPDATE tasks SET deadline = now() - interval '1 second' WHERE state = 1")
    reaped = await store.reap_expired(conn, 100, fence)
    assert sorted(r["from_state"] for r in reaped) == [3, 3]
    dead = await store.expire_deadlines(conn, 100, fence)
    assert [(r["from_state"], r["state"]) for r in dead] == [(1, 5)]
    await conn.execute("UPDATE tasks SET state = 2, run_at = now() WHERE state = 1")
    promoted = await store.promote_due(conn, 100, fence)
    assert [(r["from_state"], r["state"]) for r in promoted] == [(2, 1), (2, 1)]


async def test_a_deposed_leaders_sweep_is_still_refused(conn: asyncpg.Connection) -> None:
    old = await _fence(conn)
    await _fence(conn)  # a successor took office
    # Nothing is due, and yet each sweep's statement runs and its fence refuses it: a
    # deposed leader learns it at its next sweep, as when every sweep wrote.
    with pytest.raises(Fenced):
        await store.reap_expired(conn, 100, old)
    with pytest.raises(Fenced):
        await store.promote_due(conn, 100, old)
    with pytest.raises(Fenced):
        await store.expire_deadlines(conn, 100, old)


async def test_the_result_connections_are_planned_before_the_first_result(
    database_dsn: str, conn: asyncpg.Connection
) -> None:
    pools = Pool(coordinator_config(database_dsn))
    await pools.start()
    try:
        await pools.warm()
        held = [await pools.results.acquire() for _ in range(RESULT_CONNECTIONS)]
        try:
            for c in held:
                # asyncpg already knows the statements' array types: the first result
                # runs no type introspection.
                settings = c._protocol.get_settings()
                for name in ("_int2", "_bool", "_bytea", "_int8", "_uuid", "_text"):
                    oid = await c.fetchval("SELECT $1::regtype::oid", name)
                    assert settings.get_data_codec(oid) is not None, name
        finally:
            for c in held:
                await pools.results.release(c)
    finally:
        await pools.stop()


async def test_results_are_applied_on_the_result_connections(
    coordinator: Coordinator, stub: Stub, raw_workers: Callable[[], RawWorker]
) -> None:
    worker = raw_workers()
    await worker.connect(credits=3)
    for _ in range(3):
        await submit(stub)
    assignments = await worker.assignments(3)
    for a in assignments:
        ack = await worker.report(a.lease)
        assert ack.accepted, ack
    assert coordinator.deps is not None
    db = coordinator.deps.db
    assert db.result_pool is not None
    text = store._FINISH_PLAIN.text
    held = [await db.result_pool.acquire() for _ in range(RESULT_CONNECTIONS)]
    try:
        ran = [await c.fetchval(_PREPARED, text) for c in held]
    finally:
        for c in held:
            await db.result_pool.release(c)
    assert sum(ran) >= 1, "no result connection ran the result statement"
    # The main pool never runs it.
    held = [await db.pool.acquire() for _ in range(db.pool.get_size())]
    try:
        for c in held:
            assert await c.fetchval(_PREPARED, text) == 0
    finally:
        for c in held:
            await db.pool.release(c)


async def test_the_plain_result_statement_leaves_tasks_with_dependents_to_the_full_one(
    conn: asyncpg.Connection,
) -> None:
    fence = await _fence(conn)
    await conn.execute(_INSERT_READY, 3)
    ids = await _claim(conn, fence, 3)
    # The last task waits for the first (an edge names it as after_id).
    await conn.execute(
        "INSERT INTO task_edges (task_id, after_id, tenant, cancel_on_failure)"
        " VALUES ($1::uuid, $2::uuid, 'default', false)",
        ids[2],
        ids[0],
    )
    outcomes = [
        store.Outcome(
            LeaseKey("default", i, 1, fence.epoch, "w"), store.OUTCOME_SUCCEEDED, b"", "", False
        )
        for i in ids[:2]
    ]
    plain = await store.finish_attempts_plain(conn, outcomes, fence)
    assert [row["id"] for row in plain] == [ids[1]]
    full = await store.finish_attempts(conn, outcomes[:1], fence)
    assert [row["id"] for row in full] == [ids[0]]
