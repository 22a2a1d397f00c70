"""SQL for the ``api_keys`` table (migration 0003).

Keys change rarely and are read from memory on every call (``coordinator/key_cache.py``);
these statements serve the admin API, ``conveyor keys --dsn`` and the cache's loads. Every
change fires a NOTIFY on ``conveyor_api_keys`` from a trigger, whoever makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from conveyor.coordinator.store.sql import Query, columns

NOTIFY_CHANNEL = "conveyor_api_keys"

KEY_COLUMNS = (
    "id", "tenant", "scopes", "description", "created_by", "create_time", "expire_time",
    "revoke_time",
)  # fmt: skip
"""What a key shows (everything but its hash)."""
_KEY = columns(KEY_COLUMNS, "k")
_CACHED = f"{_KEY}, k.secret_hash"

_INSERT = Query(
    "insert_api_key",
    f"""
    INSERT INTO api_keys AS k (id, secret_hash, tenant, scopes, description, created_by,
        expire_time)
    VALUES (:id, :secret_hash, :tenant, :scopes::text[], :description, :created_by,
        :expire_time)
    ON CONFLICT (id) DO NOTHING
    RETURNING {_CACHED}
    """,
)


async def insert(
    conn: asyncpg.Connection,
    *,
    key_id: str,
    secret_hash: bytes,
    tenant: str,
    scopes: Sequence[str],
    description: str,
    created_by: str,
    expire_time: datetime | None,
) -> asyncpg.Record | None:
    """Inserts a key; returns it (hash included), or None when a key with this id exists
    already (nothing changed)."""
    return await _INSERT.fetchrow(
        conn,
        id=key_id,
        secret_hash=secret_hash,
        tenant=tenant,
        scopes=list(scopes),
        description=description,
        created_by=created_by,
        expire_time=expire_time,
    )


_GET = Query("get_api_key", f"SELECT {_CACHED} FROM api_keys k WHERE k.id = :id")


async def get(conn: asyncpg.Connection, key_id: str) -> asyncpg.Record | None:
    """The key with its hash, or None."""
    return await _GET.fetchrow(conn, id=key_id)


_ALL = Query("all_api_keys", f"SELECT {_CACHED} FROM api_keys k")


async def load_all(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every key with its hash, for the cache."""
    return await _ALL.fetch(conn)


_BY_IDS = Query(
    "api_keys_by_ids", f"SELECT {_CACHED} FROM api_keys k WHERE k.id = ANY(:ids::text[])"
)


async def load_ids(conn: asyncpg.Connection, ids: Sequence[str]) -> list[asyncpg.Record]:
    """These keys (those that exist) with their hashes, for the cache."""
    return await _BY_IDS.fetch(conn, ids=list(ids))


_LIST_PAGE = Query(
    "list_api_keys",
    f"""
    SELECT {_KEY} FROM api_keys k
    WHERE (:tenant::text IS NULL OR k.tenant = :tenant)
      AND (:show_inactive OR (k.revoke_time IS NULL
          AND (k.expire_time IS NULL OR k.expire_time > now())))
      AND (:after_time::timestamptz IS NULL OR (k.create_time, k.id) < (:after_time, :after_id))
    ORDER BY k.create_time DESC, k.id DESC
    LIMIT :limit
    """,
)


async def list_page(
    conn: asyncpg.Connection,
    *,
    tenant: str | None,
    show_inactive: bool,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Keys newest first, after the (create_time, id) of the previous page's last one."""
    return await _LIST_PAGE.fetch(
        conn,
        tenant=tenant,
        show_inactive=show_inactive,
        after_time=after[0] if after else None,
        after_id=after[1] if after else "",
        limit=limit,
    )


_REVOKE = Query(
    "revoke_api_key",
    f"""
    UPDATE api_keys k SET revoke_time = coalesce(k.revoke_time, now())
    WHERE k.id = :id
    RETURNING {_CACHED}
    """,
)


async def revoke(conn: asyncpg.Connection, key_id: str) -> asyncpg.Record | None:
    """Revokes the key (once: a second revocation keeps the first time); None if none.
    The row has the hash too, for the key cache."""
    return await _REVOKE.fetchrow(conn, id=key_id)


_ACTIVE_PER_TENANT = Query(
    "active_api_keys_per_tenant",
    """
    SELECT tenant, count(*) FILTER (
        WHERE revoke_time IS NULL AND (expire_time IS NULL OR expire_time > now())
    ) AS keys
    FROM api_keys WHERE :names::text[] IS NULL OR tenant = ANY(:names::text[])
    GROUP BY tenant
    """,
)


async def active_per_tenant(
    conn: asyncpg.Connection, names: Sequence[str] | None = None
) -> dict[str, int]:
    """Active keys per tenant, for every tenant some key (active or not) belongs to (of
    ``names`` only, when given)."""
    rows = await _ACTIVE_PER_TENANT.fetch(conn, names=None if names is None else list(names))
    return {r["tenant"]: r["keys"] for r in rows}


_HAS_ADMIN = Query(
    "has_active_admin_key",
    """
    SELECT EXISTS (SELECT 1 FROM api_keys WHERE 'admin' = ANY(scopes) AND revoke_time IS NULL
        AND (expire_time IS NULL OR expire_time > now()))
    """,
)


async def has_active_admin(conn: asyncpg.Connection) -> bool:
    """Whether some key that works now has the admin scope."""
    return bool(await _HAS_ADMIN.fetchval(conn))
