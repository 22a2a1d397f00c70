"""SQL for the ``schedules`` table.

Plain, parameterised statements. Every statement filters by tenant, except the firer's
(``due``, ``templates``, ``advance``, ``next_wake``), which act for all tenants by design,
like the maintenance sweeps.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from conveyor.coordinator.store.tasks import CANCELLED, DEAD, SUCCEEDED

SCHEDULE_COLUMNS = """
    s.id, s.tenant, s.name, s.cron, s.time_zone, s.template, s.overlap_policy,
    s.catch_up_policy, s.catch_up_limit, s.paused, s.start_time, s.end_time,
    s.next_fire_time, s.buffered_tick, s.last_task_id, s.version,
    s.create_time, s.update_time
"""


@dataclass(frozen=True)
class ScheduleRow:
    """The columns a client sets (directly or through validation) when writing a schedule."""

    tenant: str
    name: str
    cron: str
    time_zone: str
    template: bytes
    overlap_policy: int
    catch_up_policy: int
    catch_up_limit: int
    start_time: datetime | None
    end_time: datetime | None


async def insert(
    conn: asyncpg.Connection,
    schedule_id: uuid.UUID,
    row: ScheduleRow,
    *,
    paused: bool,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record | None:
    """Inserts a schedule; None when the tenant has one with that name already."""
    return await conn.fetchrow(
        f"""
        INSERT INTO schedules AS s (id, tenant, name, cron, time_zone, template,
            overlap_policy, catch_up_policy, catch_up_limit, paused, start_time, end_time,
            next_fire_time, wake_time, create_time, update_time)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14, $14)
        ON CONFLICT (tenant, name) DO NOTHING
        RETURNING {SCHEDULE_COLUMNS}
        """,
        schedule_id,
        row.tenant,
        row.name,
        row.cron,
        row.time_zone,
        row.template,
        row.overlap_policy,
        row.catch_up_policy,
        row.catch_up_limit,
        paused,
        row.start_time,
        row.end_time,
        next_fire_time,
        now,
    )


async def get(
    conn: asyncpg.Connection, tenant: str, name: str, *, for_update: bool = False
) -> asyncpg.Record | None:
    lock = "FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules s WHERE s.tenant = $1 AND s.name = $2 {lock}",
        tenant,
        name,
    )


async def list_page(
    conn: asyncpg.Connection, tenant: str, after_name: str | None, page_size: int
) -> list[asyncpg.Record]:
    """By name; fetches one row more than the page to tell whether another page exists."""
    return await conn.fetch(
        f"""
        SELECT {SCHEDULE_COLUMNS} FROM schedules s
        WHERE s.tenant = $1 AND ($2::text IS NULL OR s.name > $2)
        ORDER BY s.name
        LIMIT $3
        """,
        tenant,
        after_name,
        page_size + 1,
    )


async def update(
    conn: asyncpg.Connection,
    schedule_id: uuid.UUID,
    row: ScheduleRow,
    *,
    restart: bool,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record:
    """Writes the client-set columns; ``restart`` also moves the cursor to next_fire_time."""
    record: asyncpg.Record = await conn.fetchrow(
        f"""
        UPDATE schedules s SET cron = $3, time_zone = $4, template = $5, overlap_policy = $6,
            catch_up_policy = $7, catch_up_limit = $8, start_time = $9, end_time = $10,
            next_fire_time = CASE WHEN $11 THEN $12 ELSE s.next_fire_time END,
            wake_time = CASE WHEN $11 THEN $12 ELSE s.wake_time END,
            buffered_tick = CASE WHEN $11 THEN NULL ELSE s.buffered_tick END,
            version = s.version + 1, update_time = $13
        WHERE s.tenant = $1 AND s.id = $2
        RETURNING {SCHEDULE_COLUMNS}
        """,
        row.tenant,
        schedule_id,
        row.cron,
        row.time_zone,
        row.template,
        row.overlap_policy,
        row.catch_up_policy,
        row.catch_up_limit,
        row.start_time,
        row.end_time,
        restart,
        next_fire_time,
        now,
    )
    return record


async def delete(conn: asyncpg.Connection, tenant: str, name: str) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM schedules WHERE tenant = $1 AND name = $2 RETURNING id", tenant, name
    )
    return deleted is not None


async def pause(
    conn: asyncpg.Connection, tenant: str, name: str, now: datetime
) -> asyncpg.Record | None:
    """Pauses a schedule (a buffered tick is dropped); returns it, None if there is none."""
    return await conn.fetchrow(
        f"""
        UPDATE schedules s SET
            paused = true, buffered_tick = NULL,
            version = s.version + CASE WHEN s.paused THEN 0 ELSE 1 END,
            update_time = CASE WHEN s.paused THEN s.update_time ELSE $3 END
        WHERE s.tenant = $1 AND s.name = $2
        RETURNING {SCHEDULE_COLUMNS}
        """,
        tenant,
        name,
        now,
    )


async def resume(
    conn: asyncpg.Connection,
    tenant: str,
    schedule_id: uuid.UUID,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record:
    """Unpauses a schedule (locked by the caller) with a fresh cursor."""
    record: asyncpg.Record = await conn.fetchrow(
        f"""
        UPDATE schedules s SET paused = false, next_fire_time = $3, wake_time = $3,
            buffered_tick = NULL, version = s.version + 1, update_time = $4
        WHERE s.tenant = $1 AND s.id = $2
        RETURNING {SCHEDULE_COLUMNS}
        """,
        tenant,
        schedule_id,
        next_fire_time,
        now,
    )
    return record


async def firings(
    conn: asyncpg.Connection, tenant: str, keys: Sequence[str], task_ids: Sequence[uuid.UUID]
) -> list[asyncpg.Record]:
    """The tasks with these idempotency keys or ids: (idempotency_key, id, state, create_time)."""
    if not keys and not task_ids:
        return []
    return await conn.fetch(
        """
        SELECT idempotency_key, id, state, create_time FROM tasks
        WHERE tenant = $1 AND idempotency_key = ANY($2::text[])
        UNION
        SELECT idempotency_key, id, state, create_time FROM tasks
        WHERE tenant = $1 AND id = ANY($3::uuid[])
        """,
        tenant,
        list(keys),
        list(task_ids),
    )


# -- the firer ---------------------------------------------------------------------------


async def due(
    conn: asyncpg.Connection, now: datetime, horizon: datetime, limit: int
) -> list[asyncpg.Record]:
    """Locks up to ``limit`` schedules due, earliest first, for all tenants: by ``now``,
    or by ``horizon`` for ALLOW schedules (which the firer prepares ahead).

    ``previous_unfinished`` tells the overlap policies whether the latest firing's task is
    still unfinished; it is looked up only for schedules whose policy needs it.
    """
    return await conn.fetch(
        f"""
        SELECT s.id, s.tenant, s.cron, s.time_zone, s.version, s.overlap_policy,
            s.catch_up_policy, s.catch_up_limit, s.end_time, s.next_fire_time,
            s.buffered_tick,
            coalesce(t.state NOT IN ({SUCCEEDED}, {DEAD}, {CANCELLED}), false)
                AS previous_unfinished
        FROM schedules s
        LEFT JOIN tasks t
            ON s.overlap_policy <> 1 AND t.id = s.last_task_id AND t.tenant = s.tenant
        WHERE s.wake_time <= $2 AND NOT s.paused AND (s.wake_time <= $1 OR s.overlap_policy = 1)
        ORDER BY s.wake_time
        LIMIT $3
        FOR UPDATE OF s SKIP LOCKED
        """,
        now,
        horizon,
        limit,
    )


async def templates(
    conn: asyncpg.Connection, schedule_ids: Sequence[uuid.UUID]
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, version, template FROM schedules WHERE id = ANY($1::uuid[])",
        list(schedule_ids),
    )


@dataclass(frozen=True)
class Advance:
    """A schedule's state after one round of the firer."""

    id: uuid.UUID
    next_fire_time: datetime | None
    wake_time: datetime | None
    buffered_tick: datetime | None
    last_task_id: uuid.UUID | None
    """The newest firing's task; None leaves the column as it is."""


async def advance(conn: asyncpg.Connection, rows: Sequence[Advance]) -> None:
    """Moves the schedules' cursors, in one statement."""
    await conn.execute(
        """
        UPDATE schedules s SET
            next_fire_time = r.next_fire_time, wake_time = r.wake_time,
            buffered_tick = r.buffered_tick,
            last_task_id = coalesce(r.last_task_id, s.last_task_id)
        FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[],
            $5::uuid[])
            AS r(id, next_fire_time, wake_time, buffered_tick, last_task_id)
        WHERE s.id = r.id
        """,
        [r.id for r in rows],
        [r.next_fire_time for r in rows],
        [r.wake_time for r in rows],
        [r.buffered_tick for r in rows],
        [r.last_task_id for r in rows],
    )


async def next_wake(conn: asyncpg.Connection) -> tuple[datetime | None, datetime | None]:
    """The earliest wake_time of ALLOW schedules, and of the others."""
    row = await conn.fetchrow(
        """
        SELECT
            (SELECT min(wake_time) FROM schedules
             WHERE NOT paused AND wake_time IS NOT NULL AND overlap_policy = 1) AS allow,
            (SELECT min(wake_time) FROM schedules
             WHERE NOT paused AND wake_time IS NOT NULL AND overlap_policy <> 1) AS other
        """
    )
    return row["allow"], row["other"]
