"""SQL for ``task_types`` (per tenant and type, the defaults of a submit) and the one
``task_types_version`` counter every change moves.

A change (:func:`upsert`, :func:`delete`) takes the next version and sends a NOTIFY on
:data:`NOTIFY_CHANNEL` in its transaction, with the version, the tenant, the type and the
database's clock, so every coordinator's cache drops the entry at commit and can say how
long that took. :func:`cache_versions` and :func:`terminate_stale` are how the change's
caller learns that every coordinator's cache holds it (``lifecycle/task_types.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from conveyor.coordinator.store.sql import Query, columns

NOTIFY_CHANNEL = "conveyor_task_types"
CACHE_APPLICATION = "conveyor-types"
"""The application_name prefix of the coordinators' cache connections: ``conveyor-types
v<version>`` says which version the cache holds."""

DEFINITION_COLUMNS = (
    "tenant", "type", "queue", "priority", "max_attempts", "timeout_ms", "retry_initial_ms",
    "retry_max_ms", "retry_multiplier", "retry_jitter", "version", "update_time",
)  # fmt: skip
_DEFINITION = columns(DEFINITION_COLUMNS, "d")


@dataclass(frozen=True)
class Definition:
    """A type's defaults; None: not set."""

    tenant: str
    type: str
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout_ms: int | None = None
    retry_initial_ms: int | None = None
    retry_max_ms: int | None = None
    retry_multiplier: float | None = None
    retry_jitter: float | None = None
    version: int = 0


def definition(row: asyncpg.Record) -> Definition:
    return Definition(**{name: row[name] for name in DEFINITION_COLUMNS if name != "update_time"})


_UPSERT = Query(
    "upsert_task_type",
    f"""
    WITH v AS (
        UPDATE task_types_version SET version = version + 1 RETURNING version
    ), d AS (
        INSERT INTO task_types AS d (tenant, type, queue, priority, max_attempts, timeout_ms,
            retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, version,
            update_time)
        SELECT :tenant, :type, :queue, :priority, :max_attempts, :timeout_ms,
            :retry_initial_ms, :retry_max_ms, :retry_multiplier, :retry_jitter, v.version,
            now()
        FROM v
        ON CONFLICT (tenant, type) DO UPDATE SET queue = excluded.queue,
            priority = excluded.priority, max_attempts = excluded.max_attempts,
            timeout_ms = excluded.timeout_ms, retry_initial_ms = excluded.retry_initial_ms,
            retry_max_ms = excluded.retry_max_ms,
            retry_multiplier = excluded.retry_multiplier,
            retry_jitter = excluded.retry_jitter, version = excluded.version,
            update_time = excluded.update_time
        RETURNING {_DEFINITION}
    )
    SELECT d.*, pg_notify('{NOTIFY_CHANNEL}',
        concat_ws(' ', v.version, extract(epoch FROM clock_timestamp()), d.tenant, d.type))
        AS notified
    FROM d, v
    """,
)


async def upsert(conn: asyncpg.Connection, d: Definition) -> asyncpg.Record:
    """Writes a definition (all its fields: None clears one); returns it with its version."""
    row: asyncpg.Record | None = await _UPSERT.fetchrow(
        conn,
        tenant=d.tenant,
        type=d.type,
        queue=d.queue,
        priority=d.priority,
        max_attempts=d.max_attempts,
        timeout_ms=d.timeout_ms,
        retry_initial_ms=d.retry_initial_ms,
        retry_max_ms=d.retry_max_ms,
        retry_multiplier=d.retry_multiplier,
        retry_jitter=d.retry_jitter,
    )
    assert row is not None  # the version row always exists (migration 0010)
    return row


_DELETE = Query(
    "delete_task_type",
    f"""
    WITH d AS (
        DELETE FROM task_types WHERE tenant = :tenant AND type = :type RETURNING tenant, type
    ), v AS (
        UPDATE task_types_version SET version = version + 1
        WHERE EXISTS (SELECT 1 FROM d) RETURNING version
    )
    SELECT v.version, pg_notify('{NOTIFY_CHANNEL}',
        concat_ws(' ', v.version, extract(epoch FROM clock_timestamp()), d.tenant, d.type))
        AS notified
    FROM d, v
    """,
)


async def delete(conn: asyncpg.Connection, tenant: str, type_: str) -> int | None:
    """Deletes a definition; its version, or None when there was none."""
    row = await _DELETE.fetchrow(conn, tenant=tenant, type=type_)
    return None if row is None else int(row["version"])


_GET = Query(
    "get_task_type",
    f"SELECT {_DEFINITION} FROM task_types d WHERE d.tenant = :tenant AND d.type = :type",
)


async def get(conn: asyncpg.Connection, tenant: str, type_: str) -> asyncpg.Record | None:
    return await _GET.fetchrow(conn, tenant=tenant, type=type_)


_GET_MANY = Query(
    "get_task_types",
    f"""
    SELECT {_DEFINITION} FROM task_types d
    WHERE d.tenant = :tenant AND d.type = ANY (:types::text[])
    """,
)


async def get_many(
    conn: asyncpg.Connection, tenant: str, types: Sequence[str]
) -> list[asyncpg.Record]:
    return await _GET_MANY.fetch(conn, tenant=tenant, types=list(types))


_LIST = Query(
    "list_task_types",
    f"SELECT {_DEFINITION} FROM task_types d WHERE d.tenant = :tenant ORDER BY d.type",
)


async def list_for(conn: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await _LIST.fetch(conn, tenant=tenant)


_ALL = Query(
    "all_task_types",
    f"""
    SELECT {_DEFINITION}, (SELECT version FROM task_types_version) AS current
    FROM task_types d
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
        (SELECT version FROM task_types_version)
    """,
)


async def load_all(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], int]:
    """Every definition, and the version they make up (read together)."""
    rows = await _ALL.fetch(conn)
    return [r for r in rows if r["tenant"] is not None], int(rows[-1]["current"])


_CACHE_VERSIONS = Query(
    "task_type_cache_versions",
    f"""
    SELECT pid, split_part(application_name, ' v', 2)::bigint AS version
    FROM pg_stat_activity
    WHERE application_name LIKE '{CACHE_APPLICATION} v%' AND datname = current_database()
    """,
)


async def cache_versions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Each coordinator cache connection (pid) and the version it holds."""
    return await _CACHE_VERSIONS.fetch(conn)


_TERMINATE = Query(
    "terminate_stale_task_type_caches",
    "SELECT count(pg_terminate_backend(p)) FROM unnest(:pids::int[]) AS p",
)


async def terminate_stale(conn: asyncpg.Connection, pids: Sequence[int]) -> None:
    """Ends cache connections that did not take a change in time: their coordinators stop
    trusting their caches until they reconnect and reload."""
    await _TERMINATE.fetchval(conn, pids=list(pids))


async def announce(conn: asyncpg.Connection, version: int) -> None:
    """Says, on this cache connection, that its cache holds ``version``."""
    await conn.execute(f"SET application_name = '{CACHE_APPLICATION} v{int(version)}'")
