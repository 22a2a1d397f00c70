"""SQL for the ``tenants`` table (limits per tenant, migration 0003) and per-tenant counts.

A tenant exists as soon as something names it (a key, a task); this table only holds the
limits set for it (and its ``dispatch_weight``, migration 0012). A NULL limit is the
coordinator's default, 0 no limit. Every change
fires a NOTIFY on ``conveyor_tenants`` from a trigger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from conveyor.coordinator.store.sql import Query, columns
from conveyor.coordinator.store.tasks import BLOCKED, PENDING, RUNNING, SCHEDULED

NOTIFY_CHANNEL = "conveyor_tenants"

LIMIT_COLUMNS = (
    "max_backlog", "submit_rate", "submit_burst", "max_payload_bytes", "max_schedules",
    "dispatch_weight",
)  # fmt: skip
_ROW = columns(("name", *LIMIT_COLUMNS))

_ALL = Query("all_tenants", f"SELECT {_ROW} FROM tenants")


async def load_all(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await _ALL.fetch(conn)


_BY_NAMES = Query(
    "tenants_by_names", f"SELECT {_ROW} FROM tenants WHERE name = ANY(:names::text[])"
)


async def load_names(conn: asyncpg.Connection, names: Sequence[str]) -> list[asyncpg.Record]:
    return await _BY_NAMES.fetch(conn, names=list(names))


# Sets the columns named in :set (a text array) to the given values, keeping the others.
_UPSERT = Query(
    "upsert_tenant_limits",
    f"""
    INSERT INTO tenants AS t (name, {", ".join(LIMIT_COLUMNS)})
    VALUES (:name, {", ".join(f":{c}" for c in LIMIT_COLUMNS)})
    ON CONFLICT (name) DO UPDATE SET
        {
        ", ".join(
            f"{c} = CASE WHEN '{c}' = ANY(:set::text[]) THEN excluded.{c} ELSE t.{c} END"
            for c in LIMIT_COLUMNS
        )
    },
        update_time = now()
    RETURNING {_ROW}
    """,
)


async def set_limits(
    conn: asyncpg.Connection, name: str, values: Mapping[str, Any], fields: Sequence[str]
) -> asyncpg.Record:
    """Sets ``fields`` of the tenant's limits to ``values`` (None: back to the default)."""
    row = await _UPSERT.fetchrow(
        conn,
        name=name,
        set=list(fields),
        **{c: values.get(c) if c in fields else None for c in LIMIT_COLUMNS},
    )
    assert row is not None
    return row


# Every tenant, or those in :names (the plans are made per call: force_custom_plan).
_NAMED = "(:names::text[] IS NULL OR tenant = ANY(:names::text[]))"

# PENDING tasks are counted off the ready index (tenant first); SCHEDULED and RUNNING
# rows are fewer and their indexes have no tenant, so those counts visit the rows.
_UNFINISHED = Query(
    "unfinished_per_tenant",
    f"""
    SELECT tenant, sum(n)::bigint AS n FROM (
        SELECT tenant, count(*) AS n FROM tasks WHERE state = {PENDING} AND {_NAMED}
        GROUP BY tenant
        UNION ALL
        SELECT tenant, count(*) FROM tasks WHERE state = {SCHEDULED} AND {_NAMED}
        GROUP BY tenant
        UNION ALL
        SELECT tenant, count(*) FROM tasks WHERE state = {RUNNING} AND {_NAMED}
        GROUP BY tenant
        UNION ALL
        SELECT tenant, count(*) FROM tasks WHERE state = {BLOCKED} AND {_NAMED}
        GROUP BY tenant
    ) counts GROUP BY tenant
    """,
)


async def unfinished_per_tenant(
    conn: asyncpg.Connection, names: Sequence[str] | None = None
) -> dict[str, int]:
    """Unfinished tasks (PENDING, SCHEDULED, RUNNING, BLOCKED) per tenant that has any (of
    ``names`` only, when given)."""
    rows = await _UNFINISHED.fetch(conn, names=None if names is None else list(names))
    return {r["tenant"]: int(r["n"]) for r in rows}


_SCHEDULES = Query(
    "schedules_per_tenant",
    f"SELECT tenant, count(*) AS n FROM schedules WHERE {_NAMED} GROUP BY tenant",
)


async def schedules_per_tenant(
    conn: asyncpg.Connection, names: Sequence[str] | None = None
) -> dict[str, int]:
    rows = await _SCHEDULES.fetch(conn, names=None if names is None else list(names))
    return {r["tenant"]: int(r["n"]) for r in rows}


_LOCK_SCHEDULES = Query(
    "lock_tenant_schedules",
    "SELECT pg_advisory_xact_lock(hashtextextended('conveyor.schedules:' || :tenant, 0))",
)
_COUNT_SCHEDULES = Query(
    "count_tenant_schedules", "SELECT count(*) FROM schedules WHERE tenant = :tenant"
)


async def lock_and_count_schedules(conn: asyncpg.Connection, tenant: str) -> int:
    """The tenant's schedule count, with the tenant's schedule-creation lock held until the
    transaction ends (so two creations cannot both take the last free place).

    Two statements on purpose: under READ COMMITTED a statement's snapshot is taken before
    it waits for the lock, so a count in the locking statement would miss the schedule
    the previous holder committed while this one waited."""
    await _LOCK_SCHEDULES.execute(conn, tenant=tenant)
    return int(await _COUNT_SCHEDULES.fetchval(conn, tenant=tenant))
