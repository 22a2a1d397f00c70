"""A queue's counts at any depth (docs/performance.md, issue 19, seventh round): ListQueues,
PauseQueue and ResumeQueue count each queue's PENDING, SCHEDULED and DEAD tasks exactly up
to a cap and say which counts reached it; RUNNING is exact; a cap out of range is refused
naming the field; and the statement reads at most the cap's worth of each partial index,
in the index's order, never the table, whatever the statistics say."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest
from testsupport import error_details

from conveyor.coordinator.api import queue_ops
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Query
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc

T = task_service_pb2
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
PENDING, SCHEDULED, RUNNING, DEAD = store.PENDING, store.SCHEDULED, store.RUNNING, store.DEAD

# n tasks of one tenant, queue and state; run_at $6 minus i seconds (the first is the
# newest), priority $5; RUNNING ones hold a lease an hour long, so no reaper takes them.
_INSERT = """
    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
        attempt, max_attempts, attempt_base, run_at, timeout_ms, retry_initial_ms,
        retry_max_ms, retry_multiplier, retry_jitter, labels, traceparent, create_time,
        update_time, worker_id, lease_epoch, lease_start_time, lease_expire_time)
    SELECT gen_random_uuid(), $1, $2, 't', '\\x7b7d', '', $3::smallint, $5, 0, 3, 0,
        $6::timestamptz - g * interval '1 second', 60000, 1000, 60000, 2, 0.1, '{}', '',
        now(), now(),
        CASE WHEN $3 = 3 THEN 'w' END, CASE WHEN $3 = 3 THEN 1 END,
        CASE WHEN $3 = 3 THEN now() END, CASE WHEN $3 = 3 THEN now() + interval '1 hour' END
    FROM generate_series(1, $4::int) g
"""


async def _insert(
    conn: asyncpg.Connection,
    queue: str,
    state: int,
    n: int,
    *,
    tenant: str = "default",
    priority: int = 0,
    newest: datetime | None = None,
) -> None:
    if newest is None:
        # SCHEDULED waits for a run_at ahead; the others have theirs behind.
        newest = datetime.now(UTC) + (timedelta(hours=1) if state == SCHEDULED else timedelta())
    await conn.execute(_INSERT, tenant, queue, state, n, priority, newest)


def _counts(q: Any) -> tuple[Any, ...]:
    return (
        q.name,
        (q.pending, q.pending_capped),
        (q.scheduled, q.scheduled_capped),
        q.running,
        (q.dead, q.dead_capped),
    )


async def _list(stub: Stub, count_limit: int = 0) -> list[tuple[Any, ...]]:
    answer = await stub.ListQueues(T.ListQueuesRequest(count_limit=count_limit))
    return [_counts(q) for q in answer.queues]


async def test_list_queues_counts_up_to_the_cap_and_says_which_counts_reached_it(
    stub: Stub, db: asyncpg.Connection
) -> None:
    await _insert(db, "deep", PENDING, 12)
    await _insert(db, "deep", SCHEDULED, 11)
    await _insert(db, "deep", DEAD, 10)
    await _insert(db, "shallow", PENDING, 2)
    await _insert(db, "shallow", DEAD, 1)

    assert await _list(stub, count_limit=10) == [
        ("deep", (10, True), (10, True), 0, (10, False)),  # 10 dead: exactly the cap
        ("shallow", (2, False), (0, False), 0, (1, False)),
    ]
    assert await _list(stub, count_limit=11) == [
        ("deep", (11, True), (11, False), 0, (10, False)),
        ("shallow", (2, False), (0, False), 0, (1, False)),
    ]
    assert await _list(stub, count_limit=1) == [
        ("deep", (1, True), (1, True), 0, (1, True)),
        ("shallow", (1, True), (0, False), 0, (1, False)),
    ]
    # The server's default (10,000) is far above these: every count exact.
    assert await _list(stub) == [
        ("deep", (12, False), (11, False), 0, (10, False)),
        ("shallow", (2, False), (0, False), 0, (1, False)),
    ]


async def test_the_default_cap_applies_to_list_pause_and_resume(
    stub: Stub, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert queue_ops.DEFAULT_COUNT_LIMIT == 10_000  # as the proto comments say
    monkeypatch.setattr(queue_ops, "DEFAULT_COUNT_LIMIT", 3)
    await _insert(db, "q", PENDING, 5)
    await _insert(db, "q", DEAD, 2)
    await _insert(db, "other", PENDING, 4)

    assert await _list(stub) == [
        ("other", (3, True), (0, False), 0, (0, False)),
        ("q", (3, True), (0, False), 0, (2, False)),
    ]
    paused = (await stub.PauseQueue(T.PauseQueueRequest(queue="q"))).queue
    assert paused.paused and _counts(paused) == ("q", (3, True), (0, False), 0, (2, False))
    resumed = (await stub.ResumeQueue(T.ResumeQueueRequest(queue="q"))).queue
    assert not resumed.paused
    assert _counts(resumed) == ("q", (3, True), (0, False), 0, (2, False))
    # A queue that holds nothing is still answered for.
    empty = (await stub.PauseQueue(T.PauseQueueRequest(queue="empty"))).queue
    assert empty.paused and _counts(empty) == ("empty", (0, False), (0, False), 0, (0, False))


@pytest.mark.parametrize("count_limit", [-1, queue_ops.MAX_COUNT_LIMIT + 1, -(2**63)])
async def test_a_cap_out_of_range_is_refused_naming_the_field(stub: Stub, count_limit: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListQueues(T.ListQueuesRequest(count_limit=count_limit))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(bad.value).fields == ["count_limit"]
    assert "between 1 and 1,000,000" in (bad.value.details() or "")
    # The largest cap is taken.
    await stub.ListQueues(T.ListQueuesRequest(count_limit=queue_ops.MAX_COUNT_LIMIT))


# -- the statement, on its own ---------------------------------------------------------


async def test_every_queue_is_found_running_is_exact_and_the_oldest_is_exact_under_the_cap(
    conn: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # Found from each state alone; another tenant's queues and tasks never count.
    await _insert(conn, "only-pending", PENDING, 3, newest=now)
    # The oldest ready task has the lowest priority: last in dispatch order.
    await _insert(conn, "only-pending", PENDING, 1, priority=-5, newest=now - timedelta(days=1))
    await _insert(conn, "only-scheduled", SCHEDULED, 2)
    await _insert(conn, "only-running", RUNNING, 7)
    await _insert(conn, "only-dead", DEAD, 4)
    for queue in ("only-pending", "only-running", "theirs"):
        await _insert(conn, queue, PENDING, 5, tenant="acme")
        await _insert(conn, queue, RUNNING, 6, tenant="acme")
    # Finished tasks are no queue's count.
    await _insert(conn, "finished", store.SUCCEEDED, 3)

    rows = await store.queue_stats(conn, "default", cap=5)
    assert [(r.queue, r.pending, r.scheduled, r.running, r.dead) for r in rows] == [
        ("only-dead", 0, 0, 0, 4),
        ("only-pending", 4, 0, 0, 0),
        ("only-running", 0, 0, 7, 0),  # above the cap: running is never capped
        ("only-scheduled", 0, 2, 0, 0),
    ]
    assert not any(r.pending_capped or r.scheduled_capped or r.dead_capped for r in rows)
    assert rows[1].oldest_pending == now - timedelta(days=1, seconds=1)
    assert [r.oldest_pending for r in rows if r.queue != "only-pending"] == [None] * 3
    # Capped: the oldest of the first cap + 1 in dispatch order (so not that one).
    (capped,) = [r for r in await store.queue_stats(conn, "default", cap=2) if r.pending]
    assert capped.pending_capped and capped.pending == 2
    assert capped.oldest_pending == now - timedelta(seconds=3)
    (one,) = await store.queue_stats(conn, "acme", cap=5, queue="only-running")
    assert (one.pending, one.running) == (5, 6)


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def _explain(conn: asyncpg.Connection, query: Query, **values: Any) -> list[dict[str, Any]]:
    text = await conn.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query.text, *query.args(values)
    )
    return _nodes(json.loads(text)[0]["Plan"])


async def test_the_counts_read_at_most_the_cap_of_each_partial_index_in_its_order(
    conn: asyncpg.Connection,
) -> None:
    # Enough rows in each state that reading them all (a sequential scan of the table,
    # which the statement before this one did, or a bitmap scan of a queue's entries)
    # would look reasonable to the planner.
    for queue in ("a", "b"):
        await _insert(conn, queue, PENDING, 30_000)
        await _insert(conn, queue, SCHEDULED, 15_000)
        await _insert(conn, queue, DEAD, 15_000)
    await _insert(conn, "c", RUNNING, 50)
    await conn.execute("VACUUM ANALYZE tasks")
    cap = 100
    plans = {
        "every queue": await _explain(conn, store._QUEUE_STATS, tenant="default", limit=cap + 1),
        "one queue": await _explain(
            conn, store._ONE_QUEUE_STATS, tenant="default", queue="a", limit=cap + 1
        ),
    }
    for name, nodes in plans.items():
        types = [n["Node Type"] for n in nodes]
        assert "Seq Scan" not in types, (name, types)
        read = {n["Index Name"] for n in nodes if "Index Name" in n}
        for index in ("tasks_ready", "tasks_scheduled_queue", "tasks_dead"):
            assert index in read, (name, index, read)
            for node in nodes:
                if node.get("Index Name") != index:
                    continue
                # An ordered scan stopped by the LIMIT: never a bitmap of every entry.
                assert node["Node Type"] in ("Index Scan", "Index Only Scan"), (name, node)
                assert node["Actual Rows"] <= cap + 1, (name, index, node["Actual Rows"])
    rows = await store.queue_stats(conn, "default", cap)
    assert [(r.queue, r.pending, r.scheduled, r.running, r.dead) for r in rows] == [
        ("a", cap, cap, 0, cap),
        ("b", cap, cap, 0, cap),
        ("c", 0, 0, 50, 0),
    ]
