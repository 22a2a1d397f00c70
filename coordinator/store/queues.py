"""SQL for the ``queue_settings`` table (migration 0007): what an operator set on a queue.

A row exists only for a (tenant, queue) something was set on. Writes are the leader's
(PauseQueue and ResumeQueue are leader-only calls) and carry its fence, so a deposed
leader cannot pause a queue behind the back of the one that loaded the pauses when it
took office (``dispatch/pauses.py``).
"""

from __future__ import annotations

import asyncpg

from conveyor.coordinator.store.sql import FENCE, Fence, Query

_SET_PAUSED = Query(
    "set_queue_paused",
    f"""
    INSERT INTO queue_settings AS s (tenant, queue, paused)
    SELECT :tenant, :queue, :paused WHERE {FENCE}
    ON CONFLICT (tenant, queue) DO UPDATE SET paused = excluded.paused, update_time = now()
    """,
)


async def set_paused(
    conn: asyncpg.Connection, tenant: str, queue: str, paused: bool, fence: Fence
) -> None:
    """Pauses (or resumes) the tenant's queue. Fenced."""
    await _SET_PAUSED.execute(conn, tenant=tenant, queue=queue, paused=paused, fence=fence)


_PAUSED = Query("paused_queues", "SELECT tenant, queue FROM queue_settings WHERE paused")


async def paused(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    """Every paused (tenant, queue)."""
    return {(r["tenant"], r["queue"]) for r in await _PAUSED.fetch(conn)}


_PAUSED_OF = Query(
    "paused_queues_of_tenant",
    "SELECT queue FROM queue_settings WHERE tenant = :tenant AND paused",
)


async def paused_of(conn: asyncpg.Connection, tenant: str) -> set[str]:
    """The tenant's paused queues."""
    return {r["queue"] for r in await _PAUSED_OF.fetch(conn, tenant=tenant)}
