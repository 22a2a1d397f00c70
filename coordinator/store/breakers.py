"""SQL for the ``circuit_breakers`` table (migration 0008): the breakers that are not
closed, as the leader last wrote them (``dispatch/breakers.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from conveyor.coordinator.store.sql import Query

_ALL = Query(
    "all_circuit_breakers", "SELECT tenant, type, state, opened_time FROM circuit_breakers"
)


async def load_all(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await _ALL.fetch(conn)


_OF_TENANT = Query(
    "circuit_breakers_of_tenant",
    "SELECT type, state, opened_time FROM circuit_breakers WHERE tenant = :tenant ORDER BY type",
)


async def of_tenant(conn: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    """The tenant's breakers that are not closed, as the leader last wrote them, by type
    (ListQueues on a follower)."""
    return await _OF_TENANT.fetch(conn, tenant=tenant)


# Closed (state 0) breakers are deleted, the others written.
_SAVE = Query(
    "save_circuit_breakers",
    """
    WITH r AS (
        SELECT * FROM unnest(:tenant::text[], :type::text[], :state::smallint[],
            :opened::timestamptz[]) AS r(tenant, type, state, opened_time)
    ), gone AS (
        DELETE FROM circuit_breakers b USING r
        WHERE b.tenant = r.tenant AND b.type = r.type AND r.state = 0
    )
    INSERT INTO circuit_breakers (tenant, type, state, opened_time)
    SELECT tenant, type, state, opened_time FROM r WHERE state <> 0
    ON CONFLICT (tenant, type) DO UPDATE SET
        state = excluded.state, opened_time = excluded.opened_time
    """,
)


async def save(
    conn: asyncpg.Connection, breakers: Sequence[tuple[str, str, int, datetime | None]]
) -> None:
    """Writes (tenant, type, state, opened time) of breakers that changed."""
    if breakers:
        tenant, type_, state, opened = (list(c) for c in zip(*breakers, strict=True))
        await _SAVE.execute(conn, tenant=tenant, type=type_, state=state, opened=opened)
