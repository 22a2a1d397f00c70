"""SQL for the ``locks`` table: named locks with fencing tokens (migration 0009).

A name's row stays once made; each acquisition adds one to its ``fencing_token``, so the
tokens of one name only grow. A lock is free when it has no handle or its TTL ran out (the
database's clock decides, never a coordinator's). Every statement filters by tenant.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from conveyor.coordinator.store.sql import Query

__all__ = ["acquire", "release", "renew", "time_left"]

_ACQUIRE = Query(
    "acquire_lock",
    """
    INSERT INTO locks AS l (tenant, name, fencing_token, handle, expire_time)
    VALUES (:tenant, :name, 1, :handle, now() + make_interval(secs => :ttl))
    ON CONFLICT (tenant, name) DO UPDATE
        SET fencing_token = l.fencing_token + 1, handle = excluded.handle,
            expire_time = excluded.expire_time
        WHERE l.handle IS NULL OR l.expire_time <= now()
    RETURNING fencing_token, expire_time
    """,
)


async def acquire(
    conn: asyncpg.Connection, tenant: str, name: str, handle: bytes, ttl: float
) -> tuple[int, datetime] | None:
    """Takes the lock for ``ttl`` seconds under ``handle`` if it is free; returns its new
    fencing token and expiry, None when another holds it."""
    row = await _ACQUIRE.fetchrow(conn, tenant=tenant, name=name, handle=handle, ttl=ttl)
    return None if row is None else (row["fencing_token"], row["expire_time"])


_TIME_LEFT = Query(
    "lock_time_left",
    """
    SELECT greatest(0, extract(epoch FROM expire_time - now()))::float8 FROM locks
    WHERE tenant = :tenant AND name = :name AND handle IS NOT NULL
    """,
)


async def time_left(conn: asyncpg.Connection, tenant: str, name: str) -> float:
    """Seconds until the current holder's TTL runs out (0 when it is free)."""
    value = await _TIME_LEFT.fetchval(conn, tenant=tenant, name=name)
    return float(value or 0.0)


_RENEW = Query(
    "renew_lock",
    """
    UPDATE locks SET expire_time = now() + make_interval(secs => :ttl)
    WHERE tenant = :tenant AND name = :name AND handle = :handle AND expire_time > now()
    RETURNING expire_time
    """,
)


async def renew(
    conn: asyncpg.Connection, tenant: str, name: str, handle: bytes, ttl: float
) -> datetime | None:
    """Extends a lock still held under ``handle``; its new expiry, None once it was lost."""
    expire: datetime | None = await _RENEW.fetchval(
        conn, tenant=tenant, name=name, handle=handle, ttl=ttl
    )
    return expire


_RELEASE = Query(
    "release_lock",
    """
    UPDATE locks SET handle = NULL, expire_time = NULL
    WHERE tenant = :tenant AND name = :name AND handle = :handle
    RETURNING expire_time IS NULL
    """,
)


async def release(conn: asyncpg.Connection, tenant: str, name: str, handle: bytes) -> bool:
    """Frees the lock if ``handle`` still holds it (expired or not: nobody took it since);
    whether it did."""
    return bool(await _RELEASE.fetchval(conn, tenant=tenant, name=name, handle=handle))
