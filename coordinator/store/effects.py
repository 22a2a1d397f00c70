"""SQL for the ``task_effects`` table: the idempotency ledger of handlers (migration 0009).

An entry is written only by the attempt that holds its task's lease, checked in the same
statement on the task row (FOR SHARE: a reaper, a result or a cancel that ends the lease
waits for the record to commit, or the record sees the lease gone and writes nothing). So
an attempt that lost its lease cannot record, and every later attempt, which starts only
after its predecessor's lease ended, sees every record of it. No leader fence: the task
row is the fence, and any coordinator serves the ledger.
"""

from __future__ import annotations

import uuid

import asyncpg

from conveyor.coordinator.store.sql import Query
from conveyor.coordinator.store.tasks import RUNNING

__all__ = ["FENCING_TOKEN", "get", "record"]

FENCING_TOKEN = "((lease_epoch << 32) | attempt)"
"""An attempt's fencing token, in SQL over a tasks row (``conveyor.worker`` computes the
same: :func:`conveyor.transport.fencing_token`)."""

_ENTRY = "task_id::text AS task_id, key, result, attempt, fencing_token, create_time"

_RECORD = Query(
    "record_effect",
    f"""
    WITH lease AS (
        SELECT id, tenant, attempt, {FENCING_TOKEN} AS fencing_token FROM tasks
        WHERE tenant = :tenant AND id = :id AND state = {RUNNING} AND attempt = :attempt
          AND lease_epoch = :epoch AND lease_holder = :holder
        FOR SHARE
    ), inserted AS (
        INSERT INTO task_effects (task_id, key, tenant, result, attempt, fencing_token)
        SELECT id, :key, tenant, :result, attempt, fencing_token FROM lease
        ON CONFLICT (task_id, key) DO NOTHING
        RETURNING {_ENTRY}
    )
    SELECT EXISTS (SELECT FROM lease) AS held, inserted.*
    FROM (VALUES (1)) AS one (x) LEFT JOIN inserted ON true
    """,
)


async def record(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    task_id: uuid.UUID,
    attempt: int,
    epoch: int,
    holder: bytes,
    key: str,
    result: bytes,
) -> tuple[asyncpg.Record, bool] | None:
    """Records an effect under ``key`` for the attempt holding the lease (``holder``: the
    SHA-256 of its process's resume token). Returns the entry that stands and whether
    this call recorded it (False: an earlier record of the key stands); None when the
    lease is not held (:func:`get` then tells whether the task exists). Runs in the
    caller's transaction.

    The earlier entry is read by a second statement: the insert's snapshot cannot see a
    row a concurrent record committed while the conflict waited for it.
    """
    row = await _RECORD.fetchrow(
        conn,
        tenant=tenant,
        id=task_id,
        attempt=attempt,
        epoch=epoch,
        holder=holder,
        key=key,
        result=result,
    )
    assert row is not None  # one row, always
    if not row["held"]:
        return None
    if row["task_id"] is not None:
        return row, True
    earlier = await get(conn, tenant, task_id, key)
    # The conflict was with it; the task is leased, so neither is deleted.
    assert earlier is not None and earlier["task_id"] is not None
    return earlier, False


_GET = Query(
    "get_effect",
    """
    SELECT t.id IS NOT NULL AS task_found, e.task_id::text AS task_id, e.key, e.result,
        e.attempt, e.fencing_token, e.create_time
    FROM tasks t LEFT JOIN task_effects e ON e.task_id = t.id AND e.key = :key
    WHERE t.tenant = :tenant AND t.id = :id
    """,
)


async def get(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID, key: str
) -> asyncpg.Record | None:
    """The tenant's task with the entry recorded under ``key`` (its columns NULL when
    there is none); None when the tenant has no such task."""
    return await _GET.fetchrow(conn, tenant=tenant, id=task_id, key=key)
