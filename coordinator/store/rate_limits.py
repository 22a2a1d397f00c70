"""SQL for the ``rate_limits`` table (migration 0008): the token buckets of dispatch.

A row is one bucket: ``tenant`` ('*' for every tenant), ``queue`` ('' for every queue),
``type`` ('' for every type), its rate per second and burst, and the level the leader
last wrote back (``tokens`` at ``tokens_time``; for reading only, a new leader starts
every bucket empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from conveyor.coordinator.store.sql import Query

ALL_TENANTS = "*"
"""The ``tenant`` of a limit across all tenants."""

_ROW = "tenant, queue, type, rate, burst, tokens, tokens_time"

_ALL = Query("all_rate_limits", f"SELECT {_ROW} FROM rate_limits")


async def load_all(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every bucket, all tenants (the leader's dispatcher)."""
    return await _ALL.fetch(conn)


_OF_TENANT = Query(
    "tenant_rate_limits",
    f"""
    SELECT {_ROW} FROM rate_limits WHERE tenant = :tenant OR tenant = '{ALL_TENANTS}'
    ORDER BY tenant = '{ALL_TENANTS}', queue, type
    """,
)


async def of_tenant(conn: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    """The buckets that apply to ``tenant``: its own, then those across all tenants."""
    return await _OF_TENANT.fetch(conn, tenant=tenant)


_UPSERT = Query(
    "upsert_rate_limit",
    f"""
    INSERT INTO rate_limits AS l (tenant, queue, type, rate, burst)
    VALUES (:tenant, :queue, :type, :rate, :burst)
    ON CONFLICT (tenant, queue, type) DO UPDATE SET
        rate = excluded.rate, burst = excluded.burst,
        tokens = least(l.tokens, excluded.burst), update_time = now()
    RETURNING {_ROW}
    """,
)


async def upsert(
    conn: asyncpg.Connection, tenant: str, queue: str, type_: str, rate: float, burst: int
) -> asyncpg.Record:
    row: asyncpg.Record = await _UPSERT.fetchrow(
        conn, tenant=tenant, queue=queue, type=type_, rate=rate, burst=burst
    )
    return row


_DELETE = Query(
    "delete_rate_limit",
    "DELETE FROM rate_limits WHERE tenant = :tenant AND queue = :queue AND type = :type",
)


async def delete(conn: asyncpg.Connection, tenant: str, queue: str, type_: str) -> bool:
    """Deletes a bucket; whether there was one."""
    status = await _DELETE.execute(conn, tenant=tenant, queue=queue, type=type_)
    return status != "DELETE 0"


_SAVE_LEVELS = Query(
    "save_rate_limit_levels",
    """
    UPDATE rate_limits l SET tokens = least(r.tokens, l.burst), tokens_time = now()
    FROM unnest(:tenant::text[], :queue::text[], :type::text[], :tokens::float8[])
        AS r(tenant, queue, type, tokens)
    WHERE l.tenant = r.tenant AND l.queue = r.queue AND l.type = r.type
    """,
)


async def save_levels(
    conn: asyncpg.Connection, levels: Sequence[tuple[str, str, str, float]]
) -> None:
    """Writes the buckets' levels back (for ListQueues on any coordinator)."""
    if levels:
        tenant, queue, type_, tokens = (list(c) for c in zip(*levels, strict=True))
        await _SAVE_LEVELS.execute(conn, tenant=tenant, queue=queue, type=type_, tokens=tokens)
