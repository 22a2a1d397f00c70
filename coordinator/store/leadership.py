"""SQL for the ``leadership`` table: the leader's epoch, which fences every dispatch-side write."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from conveyor.coordinator.errors import Fenced


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
    epoch: int | None = await conn.fetchval(
        """
        WITH term AS (
            INSERT INTO leadership (cluster, epoch, leader_id, address, term_revision)
            VALUES ($1, 1, $2, $3, coalesce($4, 0))
            ON CONFLICT (cluster) DO UPDATE
                SET epoch = leadership.epoch + 1, leader_id = excluded.leader_id,
                    address = excluded.address, update_time = now(),
                    term_revision = coalesce($4, leadership.term_revision)
                WHERE $4::bigint IS NULL OR leadership.term_revision < $4
            RETURNING cluster, epoch, leader_id, address, term_revision
        ), recorded AS (
            INSERT INTO leadership_terms (cluster, epoch, leader_id, address, term_revision)
            SELECT * FROM term
        )
        SELECT epoch FROM term
        """,
        cluster,
        leader_id,
        address,
        term_revision,
    )
    return epoch


FENCED_SQLSTATE = "CVF01"


# Test-only fault switch (CONVEYOR_UNSAFE_DISABLE_FENCING=1): every fence check passes.
# It exists so the failover tests can show their checker catches what fencing prevents.
UNSAFE_DISABLE_FENCING = os.environ.get("CONVEYOR_UNSAFE_DISABLE_FENCING") == "1"


@dataclass(frozen=True)
class Fence:
    """The fencing token of one leader: its cluster and epoch.

    ``sql(n)`` is the condition to put in a dispatch-side statement's WHERE clause, with
    ``params`` appended to the statement's parameters as $n and $n+1. Run the statement
    inside ``with fencing(fence):`` to turn a failed check into :class:`Fenced`.
    """

    cluster: str
    epoch: int

    @property
    def params(self) -> tuple[str, int]:
        return (self.cluster, self.epoch)

    @staticmethod
    def sql(first_param: int) -> str:
        if UNSAFE_DISABLE_FENCING:
            return f"(${first_param}::text IS NOT NULL OR ${first_param + 1}::bigint > 0)"
        return f"(SELECT conveyor_fence(${first_param}::text, ${first_param + 1}::bigint))"


@contextlib.contextmanager
def fencing(fence: Fence) -> Iterator[None]:
    """Translates the database's fencing failure into :class:`Fenced`."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == FENCED_SQLSTATE:
            raise Fenced(fence.epoch, None) from exc
        raise


async def check_epoch(conn: asyncpg.Connection, fence: Fence) -> None:
    """Raises Fenced unless the fence's epoch is still the cluster's.

    For transactions of several statements: call it first inside the transaction; the
    leadership row stays share-locked until the transaction ends.
    """
    with fencing(fence):
        await conn.execute(f"SELECT {Fence.sql(1)}", *fence.params)


async def current(conn: asyncpg.Connection, cluster: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT epoch, leader_id, address, update_time FROM leadership WHERE cluster = $1", cluster
    )
