"""The handler skeleton, once: a connection to read with, one for single-statement writes,
or a fenced write transaction.

``async with db.write(fence) as conn:`` acquires a connection, begins, checks the leader's
epoch first (so the leadership row stays share-locked until the commit), and commits. A
write that loses its connection while its COMMIT (or, with :func:`committing`, its single
autocommit statement) is on the way raises :class:`OutcomeUnknown`: it may have been
applied, so "retry shortly" would be a lie for a write without an idempotency key.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg

from conveyor.coordinator.errors import OutcomeUnknown, is_connection_loss
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store.sql import Fence


@contextlib.contextmanager
def committing() -> Iterator[None]:
    """Around a write whose commit is in flight: a lost connection becomes OutcomeUnknown."""
    try:
        yield
    except Exception as exc:
        if is_connection_loss(exc):
            raise OutcomeUnknown(f"{type(exc).__name__}: {exc}") from exc
        raise


class Database:
    """The coordinator's connection pool, with the two ways handlers use it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def read(self) -> asyncpg.pool.PoolAcquireContext:
        """A pooled connection to read with: ``async with db.read() as conn``."""
        return self.pool.acquire()

    def autocommit(self) -> asyncpg.pool.PoolAcquireContext:
        """A pooled connection for writes that are one statement each, each its own
        transaction (a group commit's, a claim, a sweep): ``async with db.autocommit()``.
        Wrap a statement whose loss of connection must say OUTCOME_UNKNOWN in
        :func:`committing`."""
        return self.pool.acquire()

    @contextlib.asynccontextmanager
    async def write(self, fence: Fence | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A transaction, fenced by ``fence`` when given; committed when the block ends."""
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                if fence is not None:
                    await leadership.check_epoch(conn, fence)
                yield conn
            except BaseException:
                # A broken connection cannot roll back; the server already has.
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            with committing():
                await transaction.commit()
