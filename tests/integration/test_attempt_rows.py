"""Attempt rows without a foreign key check (migration 0013): they are written as before,
and still go with their task when it is deleted, by any statement that deletes tasks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from conveyor.coordinator import Coordinator
from conveyor.coordinator.api.validation import NewTask
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Fence
from conveyor.coordinator.store.tasks import NewRow, Outcome


def _task() -> NewTask:
    return NewTask(
        queue="attempt-rows",
        type="nobody-runs-this",
        payload=b"",
        content_type="",
        priority=0,
        max_attempts=3,
        idempotency_key=None,
        request_hash=b"",
        run_at=None,
        timeout_ms=60_000,
        retry_initial_ms=1000,
        retry_max_ms=60_000,
        retry_multiplier=2.0,
        retry_jitter=0.1,
        labels={},
        traceparent="",
    )


async def _finished(db: asyncpg.Connection, fence: Fence, count: int) -> list[str]:
    """``count`` tasks run to SUCCEEDED through the store's own statements; their ids."""
    now = datetime.now(UTC)
    rows = [NewRow("default", uuid7(), _task(), store.PENDING, now) for _ in range(count)]
    await store.insert_new(db, rows, now)
    claimed = await store.claim(
        db,
        tenant="default",
        queues=["attempt-rows"],
        types=["nobody-runs-this"],
        keys=None,
        limit=count,
        max_bytes=1 << 20,
        worker_id="w1",
        holder=b"h",
        lease_seconds=30.0,
        fence=fence,
    )
    assert len(claimed) == count
    outcomes = [
        Outcome(
            LeaseKey("default", r["id"], r["attempt"], r["epoch"], "w1"),
            store.OUTCOME_SUCCEEDED,
            b"ok",
            "",
            False,
        )
        for r in claimed
    ]
    finished = await store.finish_attempts(db, outcomes, fence)
    assert len(finished) == count
    return [str(r.id) for r in rows]


async def _attempts(db: asyncpg.Connection, ids: list[str]) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1::uuid[])", ids
    )
    return count


async def test_deleted_tasks_take_their_attempt_rows_along(
    db: asyncpg.Connection, coordinator: Coordinator
) -> None:
    assert coordinator.deps is not None
    fence = coordinator.deps.office.fence()
    purged, deleted, kept = [await _finished(db, fence, 3) for _ in range(3)]
    assert await _attempts(db, purged + deleted + kept) == 9

    # Retention's statement (many tasks at once), and a plain DELETE of one.
    gone = await store.purge_expired(db, datetime.now(UTC) + timedelta(days=1), limit=3)
    assert len(gone) == 3
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[])", purged) == 0
    await db.execute("DELETE FROM tasks WHERE id = ANY($1::uuid[])", deleted)

    assert await _attempts(db, purged) == 0
    assert await _attempts(db, deleted) == 0
    assert await _attempts(db, kept) == 3
