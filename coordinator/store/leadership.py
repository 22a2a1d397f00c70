"""SQL for the ``leadership`` table: the leader's epoch, which fences every dispatch-side write."""

from __future__ import annotations

import asyncpg

from conveyor.coordinator.errors import Fenced


async def take_office(conn: asyncpg.Connection, cluster: str, leader_id: str, address: str) -> int:
    """Starts a new term: bumps the cluster's epoch and returns it.

    The UPDATE waits for every in-flight transaction that holds the row FOR SHARE (the old
    leader's writes), and every later check_epoch sees the new value.
    """
    epoch: int = await conn.fetchval(
        """
        INSERT INTO leadership (cluster, epoch, leader_id, address) VALUES ($1, 1, $2, $3)
        ON CONFLICT (cluster) DO UPDATE
            SET epoch = leadership.epoch + 1, leader_id = excluded.leader_id,
                address = excluded.address, update_time = now()
        RETURNING epoch
        """,
        cluster,
        leader_id,
        address,
    )
    return epoch


async def check_epoch(conn: asyncpg.Connection, cluster: str, epoch: int) -> None:
    """Raises Fenced unless ``epoch`` is still the cluster's.

    Call it inside the transaction of the write it guards.
    """
    current = await conn.fetchval(
        "SELECT epoch FROM leadership WHERE cluster = $1 FOR SHARE", cluster
    )
    if current != epoch:
        raise Fenced(epoch, current)


async def current(conn: asyncpg.Connection, cluster: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT epoch, leader_id, address, update_time FROM leadership WHERE cluster = $1", cluster
    )
