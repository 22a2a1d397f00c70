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

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.errors import OutcomeUnknown, is_connection_loss
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as task_store
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

    def __init__(
        self,
        pool: asyncpg.Pool,
        claims: asyncpg.Pool | None = None,
        results: asyncpg.Pool | None = None,
    ) -> None:
        self.pool = pool
        self.claim_pool = claims
        """The connection for the plain claim alone (:data:`CLAIM_SETTINGS`), or None:
        the claim then runs on the dispatcher's pooled connection like every statement."""
        self.result_pool = results
        """The connections of the result flushes alone (:data:`RESULT_CONNECTIONS`), or
        None: they then take the main pool's."""

    def claims(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection | None]:
        """The claim connection for one dispatch round (``async with db.claims() as c``),
        or None without a claim pool."""
        if self.claim_pool is None:
            return contextlib.nullcontext()
        return self.claim_pool.acquire()

    def results(self) -> asyncpg.pool.PoolAcquireContext:
        """A connection for one result flush, its statements each their own transaction
        (``async with db.results() as conn``): the result pool's, else the main pool's."""
        return (self.result_pool or self.pool).acquire()

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing beyond what asyncpg always does
    (roll back an open transaction, drop listeners).

    asyncpg's default also sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip on every submit's way to its answer, and
    one more statement for PostgreSQL per batch, to undo session state that pooled
    connections never hold here. Locks and settings are transaction-level
    (``pg_advisory_xact_lock``), no cursor outlives its transaction, and the key
    directory LISTENs on a connection of its own (``tenancy/directory.py``). Code that adds
    session state to a pooled connection must undo it itself.
    """


CLAIM_SETTINGS = {
    # The plain claim (store.tasks.claim without aging) is planned once per connection
    # and then reused: planning it was 0.4-0.9 ms a claim, about a quarter of
    # PostgreSQL's CPU for the claim at ~70 tasks a claim (docs/performance.md, issue 19,
    # third round). It is the one statement on this connection.
    "plan_cache_mode": "force_generic_plan",
    # What makes a plan made once safe whatever the table holds then or later: a
    # generic plan does not know the claim's LIMIT (it guesses a tenth of the ready
    # rows), so with statistics of a deep backlog it would join the claimed rows to
    # `tasks` by a hash join over a sequential scan: every row of the table per claim.
    # With these off, the only plans left are the ones a custom plan picks: the ready
    # index per queue, the primary key per claimed row (a nested loop), the subscriptions'
    # index. PostgreSQL 18 counts disabled nodes before costs, so no statistics change it.
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}
"""Session settings of the claim connection (:attr:`Database.claim_pool`), over the pool's."""

RESULT_CONNECTIONS = 2
"""The result pool's size: as many as the result batcher flushes at once
(``lifecycle/results.py``).

Why a pool of their own: the main pool hands out its connections in turn, so every one
of them ran the result statement sooner or later, and each paid once what a connection
pays for a statement it has not run before: asyncpg's type introspection of its array
types (a catalog query planned anew: 5-40 ms) and PostgreSQL's first planning of it on a
backend whose catalog caches are cold (6-15 ms against 0.75). Counted over the end-to-end
phase of ``conveyor bench`` (20,000 tasks), that was 60-430 ms of PostgreSQL's CPU, 3-20
µs per task (docs/performance.md, issue 19, fifth round). Two connections that only ever
run it pay it twice, and :meth:`Pool.warm` pays it before the first result."""


class Pool:
    """The coordinator's connection pools, as a component: opened at start, closed at
    stop. The main pool, one connection for the dispatcher's plain claims, and
    :data:`RESULT_CONNECTIONS` for the result flushes."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self._config = config
        self._pool: asyncpg.Pool | None = None
        self._claims: asyncpg.Pool | None = None
        self._results: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the pool is opened by start()"
        return self._pool

    @property
    def claims(self) -> asyncpg.Pool:
        assert self._claims is not None, "the pool is opened by start()"
        return self._claims

    @property
    def results(self) -> asyncpg.Pool:
        assert self._results is not None, "the pool is opened by start()"
        return self._results

    async def start(self) -> None:
        cfg = self._config
        self._pool = await asyncpg.create_pool(
            cfg.dsn,
            min_size=cfg.pool_min_size,
            max_size=cfg.pool_max_size,
            command_timeout=cfg.statement_timeout,
            server_settings=_session_settings(),
            reset=_keep_session,
        )
        # One connection: the dispatcher claims one claim at a time.
        self._claims = await asyncpg.create_pool(
            cfg.dsn,
            min_size=1,
            max_size=1,
            command_timeout=cfg.statement_timeout,
            server_settings={**_session_settings(), **CLAIM_SETTINGS},
            reset=_keep_session,
        )
        self._results = await asyncpg.create_pool(
            cfg.dsn,
            min_size=RESULT_CONNECTIONS,
            max_size=RESULT_CONNECTIONS,
            command_timeout=cfg.statement_timeout,
            server_settings=_session_settings(),
            reset=_keep_session,
        )

    async def warm(self) -> None:
        """Readies the result connections for their statements (once the schema is
        migrated): each plans them once, which introspects their types and fills the
        backend's catalog caches, so the first results are not the ones that pay."""
        held = [await self.results.acquire() for _ in range(RESULT_CONNECTIONS)]
        try:
            for conn in held:
                await task_store.warm_results(conn)
        finally:
            for conn in held:
                await self.results.release(conn)

    async def stop(self) -> None:
        if self._results is not None:
            await self._results.close()
        if self._claims is not None:
            await self._claims.close()
        if self._pool is not None:
            await self._pool.close()


def _session_settings() -> dict[str, str]:
    """The session settings of every coordinator connection."""
    return {
        # asyncpg prepares every statement; after a few runs PostgreSQL may switch
        # to a generic plan made when the tables were small (a sequential scan
        # joined to 1000 results: seconds per batch once the table has grown).
        # Planning each batch anew costs far less than that.
        "plan_cache_mode": "force_custom_plan",
        # Batch statements look expensive to the planner; compiling them is not
        # worth it for millisecond queries.
        "jit": "off",
        # A transaction of ours holds the leadership row FOR SHARE (the fence)
        # until it ends. If this process freezes mid-transaction (SIGSTOP, a VM
        # pause), that lock would keep the next leader from taking office for as
        # long as the freeze lasts; PostgreSQL ends such a session instead. Our
        # transactions never sit idle for more than a moment otherwise.
        "idle_in_transaction_session_timeout": "5s",
        "application_name": "conveyor-coordinator",
    }
