"""SQL for the ``leadership`` table: the leader's epoch, which fences every dispatch-side write."""

from __future__ import annotations

import asyncpg

from conveyor.coordinator.store.sql import FENCE, UNSAFE_DISABLE_FENCING, Fence, Query

__all__ = ["UNSAFE_DISABLE_FENCING", "Fence", "check_epoch", "current", "take_office"]

_TAKE_OFFICE = Query(
    "take_office",
    """
    WITH term AS (
        INSERT INTO leadership (cluster, epoch, leader_id, address, term_revision)
        VALUES (:cluster, 1, :leader_id, :address, coalesce(:term_revision, 0))
        ON CONFLICT (cluster) DO UPDATE
            SET epoch = leadership.epoch + 1, leader_id = excluded.leader_id,
                address = excluded.address, update_time = now(),
                term_revision = coalesce(:term_revision, leadership.term_revision)
            WHERE :term_revision::bigint IS NULL OR leadership.term_revision < :term_revision
        RETURNING cluster, epoch, leader_id, address, term_revision
    ), recorded AS (
        INSERT INTO leadership_terms (cluster, epoch, leader_id, address, term_revision)
        SELECT * FROM term
    )
    SELECT epoch FROM term
    """,
)


async def take_office(
    conn: asyncpg.Connection,
    cluster: str,
    leader_id: str,
    address: str,
    term_revision: int | None = None,
) -> int | None:
    """Starts a new term: bumps the cluster's epoch and returns it.

    With ``term_revision`` (the etcd revision the election was won at), the term is
    refused (None) unless that revision is newer than the recorded one: a candidate that
    stalled between winning in etcd and getting here must not displace a newer leader.
    The UPDATE waits for every in-flight transaction that holds the row FOR SHARE (the old
    leader's writes), and every later fence check sees the new value.
    """
    epoch: int | None = await _TAKE_OFFICE.fetchval(
        conn, cluster=cluster, leader_id=leader_id, address=address, term_revision=term_revision
    )
    return epoch


_CHECK_EPOCH = Query("check_epoch", f"SELECT {FENCE}")


async def check_epoch(conn: asyncpg.Connection, fence: Fence) -> None:
    """Raises Fenced unless the fence's epoch is still the cluster's.

    For transactions of several statements: run it first inside the transaction; the
    leadership row stays share-locked until the transaction ends.
    """
    await _CHECK_EPOCH.execute(conn, fence=fence)


_CURRENT = Query(
    "current_leadership",
    "SELECT epoch, leader_id, address, update_time FROM leadership WHERE cluster = :cluster",
)


async def current(conn: asyncpg.Connection, cluster: str) -> asyncpg.Record | None:
    return await _CURRENT.fetchrow(conn, cluster=cluster)
