"""Exactly-once effects in the handler's own PostgreSQL: the ledger row and the effect in
one transaction, with the attempt's fencing token checked in that transaction.

The coordinator's ledger (``ctx.ledger``) leaves one gap: a crash between the effect and
its record repeats the effect. When the effect is a write to a PostgreSQL database of
the handler's own, the record can share its transaction, and the gap closes: either both
commit or neither does. The classic IsProcessed / MarkProcessed pattern, fenced::

    from conveyor.worker import pg_ledger

    async with conn.transaction():
        if await pg_ledger.is_processed(conn, ctx, "credit"):
            return "done before"
        await conn.execute("UPDATE accounts SET balance = balance + $1 WHERE id = $2", ...)
        await pg_ledger.mark_processed(conn, ctx, "credit")

:func:`is_processed` first checks the attempt's fencing token (``ctx.fencing_token``)
against the largest the database has seen for the task, and takes that row's lock until
the transaction ends: an older attempt still running (its lease expired while it was
paused) is refused with :class:`StaleFencingTokenError`, and two attempts never run the
block at once. The tables are created by :func:`create_tables` (or by hand from
:data:`SCHEMA`), in the database the effects go to. ``conn`` is an asyncpg connection
(asyncpg is a dependency of Conveyor already).

:func:`check_fencing_token` is the check on its own, for any resource: a lock holder
(``ctx.lock``, ``client.lock``) calls it with the lock's name and token in the
transaction of each write it protects.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = [
    "SCHEMA",
    "StaleFencingTokenError",
    "check_fencing_token",
    "create_tables",
    "is_processed",
    "mark_processed",
]

SCHEMA = """
-- The largest fencing token each resource accepted (a task, a lock name, ...).
CREATE TABLE IF NOT EXISTS conveyor_fencing_tokens (
    resource      text PRIMARY KEY,
    fencing_token bigint NOT NULL
);
-- The effects done, one row per (tenant, task, key), written in the effect's transaction.
CREATE TABLE IF NOT EXISTS conveyor_processed (
    tenant        text NOT NULL,
    task_id       uuid NOT NULL,
    key           text NOT NULL,
    fencing_token bigint NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, task_id, key)
);
"""
"""The two tables the helpers use; :func:`create_tables` runs it (idempotent)."""


class StaleFencingTokenError(Exception):
    """A write came with a fencing token smaller than one the resource already accepted:
    its writer lost its lease or lock. Nothing was written; roll the transaction back.

    Attributes:
        resource: What was written to.
        fencing_token: The token refused.
    """

    def __init__(self, resource: str, fencing_token: int) -> None:
        super().__init__(
            f"fencing token {fencing_token} for {resource!r} is stale: a newer holder "
            "(a later attempt, or the lock's next holder) wrote already; this one lost its "
            "lease or lock and must write nothing"
        )
        self.resource = resource
        self.fencing_token = fencing_token


class _Connection(Protocol):
    """What is used of an asyncpg connection."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    def is_in_transaction(self) -> bool: ...


class _Attempt(Protocol):
    """What is used of a :class:`~conveyor.worker.TaskContext`."""

    @property
    def tenant(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def fencing_token(self) -> int: ...


_CHECK = """
INSERT INTO conveyor_fencing_tokens AS f (resource, fencing_token) VALUES ($1, $2)
ON CONFLICT (resource) DO UPDATE SET fencing_token = excluded.fencing_token
    WHERE f.fencing_token <= excluded.fencing_token
RETURNING true
"""

_PROCESSED = "SELECT true FROM conveyor_processed WHERE tenant = $1 AND task_id = $2 AND key = $3"

_MARK = """
INSERT INTO conveyor_processed (tenant, task_id, key, fencing_token) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant, task_id, key) DO NOTHING
"""


async def create_tables(conn: _Connection) -> None:
    """Creates the helpers' tables (:data:`SCHEMA`) if they do not exist."""
    await conn.execute(SCHEMA)


def _require_transaction(conn: _Connection, what: str) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError(
            f"{what} must run inside the transaction of the effect "
            "(async with conn.transaction(): ...): outside one it fences nothing"
        )


async def check_fencing_token(conn: _Connection, resource: str, fencing_token: int) -> None:
    """Accepts ``fencing_token`` for ``resource`` unless a larger one was accepted, and
    holds the resource's row lock until the transaction ends (a concurrent writer waits,
    then sees the new token).

    Raises:
        StaleFencingTokenError: A larger token was accepted for ``resource`` already.
    """
    _require_transaction(conn, "check_fencing_token")
    if not await conn.fetchval(_CHECK, resource, fencing_token):
        raise StaleFencingTokenError(resource, fencing_token)


def _resource(ctx: _Attempt) -> str:
    return f"task:{ctx.tenant}:{ctx.task_id}"


async def is_processed(conn: _Connection, ctx: _Attempt, key: str) -> bool:
    """Whether the effect under ``key`` of this task was done (by any attempt), after
    checking this attempt's fencing token (see the module docstring).

    Raises:
        StaleFencingTokenError: A later attempt of the task wrote already.
    """
    _require_transaction(conn, "is_processed")
    await check_fencing_token(conn, _resource(ctx), ctx.fencing_token)
    return bool(await conn.fetchval(_PROCESSED, ctx.tenant, ctx.task_id, key))


async def mark_processed(conn: _Connection, ctx: _Attempt, key: str) -> None:
    """Records, in the effect's transaction, that the effect under ``key`` was done.

    Raises:
        StaleFencingTokenError: A later attempt of the task wrote already.
    """
    _require_transaction(conn, "mark_processed")
    await check_fencing_token(conn, _resource(ctx), ctx.fencing_token)
    await conn.execute(_MARK, ctx.tenant, ctx.task_id, key, ctx.fencing_token)
