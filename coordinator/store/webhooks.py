"""SQL for webhooks: ``webhook_subscriptions``, the ``webhook_outbox`` and ``webhook_attempts``.

The outbox is written by :data:`OUTBOX_SQL`, a fragment of every state-changing statement
(``transitions.py``): one row per transition and matching subscription, none when the
task's tenant has none (the join decides, in the statement: no query of its own and
nothing per task in Python). The leader's deliverer reads what is due (:func:`due`) and
records each round's attempts in one statement (:func:`record_attempts`). Every other
statement filters by tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from conveyor.coordinator.store.sql import FENCE, Fence, Query, columns

PENDING = 0
DELIVERED = 1
FAILED = 2


def outbox_sql(source: str) -> str:
    """The outbox fragment over ``source``, rows of :data:`transitions.COPY_COLUMNS`
    (``changed``, or it and the dependents a release fragment moved)."""
    return f"""
    INSERT INTO webhook_outbox (subscription_id, tenant, task_id, queue, type, from_state,
        to_state, attempt)
    SELECT s.id, c.tenant, c.id, c.queue, c.type, c.from_state, c.state, c.attempt
    FROM {source} c
    JOIN webhook_subscriptions s ON s.tenant = c.tenant
    -- Planned as a one-time test: without any subscription, the join does not look up
    -- each changed row (0.9 us a task of a claim's or a result's CPU, docs/performance.md,
    -- issue 19, fifth round).
    WHERE EXISTS (SELECT FROM webhook_subscriptions)
      AND (s.states = '{{}}' OR c.state = ANY (s.states))
      AND (s.queues = '{{}}' OR c.queue = ANY (s.queues))
      AND (s.types = '{{}}' OR c.type = ANY (s.types))"""


OUTBOX_SQL = outbox_sql("changed")
"""The outbox fragment: reads only id, tenant, queue, type, from_state, state and attempt
of ``changed``, so it also runs after a COPY (``transitions.after_copy``)."""

GATE_SQL = "EXISTS (SELECT 1 FROM webhook_subscriptions WHERE tenant = ANY (:tenants::text[]))"
"""Whether any of the tenants ``:tenants`` has a subscription: the fragment's gate after a
COPY (nothing to write for tenants without)."""

SUBSCRIPTION_COLUMNS = (
    "id", "tenant", "url", "secret", "states", "queues", "types", "description",
    "create_time",
)  # fmt: skip
_SUBSCRIPTION = columns(SUBSCRIPTION_COLUMNS, "s")

DELIVERY_COLUMNS = (
    "id", "subscription_id", "task_id", "queue", "type", "from_state", "to_state", "attempt",
    "event_time", "status", "attempts", "next_attempt_time", "last_status_code", "last_error",
    "delivered_time",
)  # fmt: skip
_DELIVERY = columns(DELIVERY_COLUMNS, "o")


@dataclass(frozen=True)
class NewSubscription:
    tenant: str
    url: str
    secret: str
    states: Sequence[int]
    queues: Sequence[str]
    types: Sequence[str]
    description: str


# -- subscriptions -------------------------------------------------------------------------

_CREATE = Query(
    "create_webhook",
    f"""
    INSERT INTO webhook_subscriptions AS s (id, tenant, url, secret, states, queues, types,
        description)
    SELECT :id, :tenant, :url, :secret, :states, :queues, :types, :description
    WHERE (SELECT count(*) FROM webhook_subscriptions WHERE tenant = :tenant) < :limit
    RETURNING {_SUBSCRIPTION}
    """,
)


async def create(
    conn: asyncpg.Connection, sub: NewSubscription, limit: int
) -> asyncpg.Record | None:
    """Creates a subscription; None when the tenant already has ``limit`` of them."""
    return await _CREATE.fetchrow(
        conn,
        id=uuid.uuid4(),
        tenant=sub.tenant,
        url=sub.url,
        secret=sub.secret,
        states=list(sub.states),
        queues=list(sub.queues),
        types=list(sub.types),
        description=sub.description,
        limit=limit,
    )


_LIST = Query(
    "list_webhooks",
    f"SELECT {_SUBSCRIPTION} FROM webhook_subscriptions s WHERE s.tenant = :tenant "
    "ORDER BY s.create_time, s.id",
)


async def list_for(conn: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await _LIST.fetch(conn, tenant=tenant)


_GET = Query(
    "get_webhook",
    f"SELECT {_SUBSCRIPTION} FROM webhook_subscriptions s WHERE s.tenant = :tenant AND s.id = :id",
)


async def get(conn: asyncpg.Connection, tenant: str, sub_id: uuid.UUID) -> asyncpg.Record | None:
    return await _GET.fetchrow(conn, tenant=tenant, id=sub_id)


_DELETE = Query(
    "delete_webhook",
    "DELETE FROM webhook_subscriptions WHERE tenant = :tenant AND id = :id RETURNING id",
)


async def delete(conn: asyncpg.Connection, tenant: str, sub_id: uuid.UUID) -> bool:
    """Deletes a subscription and what its outbox holds; False when there was none."""
    return await _DELETE.fetchval(conn, tenant=tenant, id=sub_id) is not None


# -- deliveries ----------------------------------------------------------------------------

_DUE = Query(
    "webhook_deliveries_due",
    f"""
    SELECT {_DELIVERY}, o.tenant, o.retry_from, s.url, s.secret
    FROM webhook_outbox o
    JOIN webhook_subscriptions s ON s.id = o.subscription_id
    WHERE o.status = {PENDING} AND o.next_attempt_time <= now()
    ORDER BY o.next_attempt_time, o.id
    LIMIT :limit
    """,
)


async def due(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """The deliveries due now, oldest first, with their subscription's URL and secret."""
    return await _DUE.fetch(conn, limit=limit)


_RECORD = Query(
    "record_webhook_attempts",
    f"""
    WITH r AS (
        SELECT * FROM unnest(:id::bigint[], :status_code::int[], :error::text[],
            :duration_ms::int[], :delivered::bool[], :backoff::float8[])
            AS r(id, status_code, error, duration_ms, delivered, backoff)
    ), o AS (
        UPDATE webhook_outbox o SET
            attempts = o.attempts + 1,
            last_status_code = r.status_code,
            last_error = r.error,
            status = CASE
                WHEN r.delivered THEN {DELIVERED}
                WHEN now() + make_interval(secs => r.backoff)
                    > o.retry_from + make_interval(secs => :retry_for) THEN {FAILED}
                ELSE {PENDING} END,
            next_attempt_time = now() + make_interval(secs => r.backoff),
            delivered_time = CASE WHEN r.delivered THEN now() END
        FROM r
        WHERE {FENCE} AND o.id = r.id AND o.status = {PENDING}
        RETURNING o.id, o.attempts, o.tenant, r.status_code, r.error, r.duration_ms
    )
    INSERT INTO webhook_attempts (outbox_id, attempt, tenant, status_code, error, duration_ms)
    SELECT id, attempts, tenant, status_code, error, duration_ms FROM o
    """,
)


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt's result."""

    outbox_id: int
    status_code: int | None
    error: str
    duration_ms: int
    delivered: bool
    backoff: float
    """Seconds until the next attempt, should this one have failed."""


async def record_attempts(
    conn: asyncpg.Connection, attempts: Sequence[Attempt], retry_for: float, fence: Fence
) -> None:
    """Records a round of attempts in one statement (fenced: the leader's write)."""
    if not attempts:
        return
    await _RECORD.execute(
        conn,
        id=[a.outbox_id for a in attempts],
        status_code=[a.status_code for a in attempts],
        error=[a.error for a in attempts],
        duration_ms=[a.duration_ms for a in attempts],
        delivered=[a.delivered for a in attempts],
        backoff=[a.backoff for a in attempts],
        retry_for=retry_for,
        fence=fence,
    )


_DELIVERIES = Query(
    "list_webhook_deliveries",
    f"""
    SELECT {_DELIVERY} FROM webhook_outbox o
    WHERE o.tenant = :tenant AND o.subscription_id = :subscription_id
      AND (:status::smallint IS NULL OR o.status = :status)
      AND (:before::bigint IS NULL OR o.id < :before)
    ORDER BY o.id DESC
    LIMIT :limit
    """,
)


async def deliveries(
    conn: asyncpg.Connection,
    tenant: str,
    subscription_id: uuid.UUID,
    *,
    status: int | None,
    before: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    """A subscription's deliveries, newest first, ``before`` an outbox id (a page)."""
    return await _DELIVERIES.fetch(
        conn,
        tenant=tenant,
        subscription_id=subscription_id,
        status=status,
        before=before,
        limit=limit,
    )


_ATTEMPTS = Query(
    "list_webhook_attempts",
    """
    SELECT outbox_id, attempt, time, status_code, error, duration_ms FROM webhook_attempts
    WHERE tenant = :tenant AND outbox_id = ANY (:ids::bigint[])
    ORDER BY outbox_id, attempt
    """,
)


async def attempts_of(
    conn: asyncpg.Connection, tenant: str, ids: Sequence[int]
) -> list[asyncpg.Record]:
    return await _ATTEMPTS.fetch(conn, tenant=tenant, ids=list(ids))


_REPLAY = Query(
    "replay_webhook_deliveries",
    f"""
    UPDATE webhook_outbox o SET status = {PENDING}, next_attempt_time = now(),
        retry_from = now(), delivered_time = NULL
    WHERE o.tenant = :tenant AND o.subscription_id = :subscription_id
      AND (o.id = ANY (:ids::bigint[]) OR (:all_failed AND o.status = {FAILED}))
    RETURNING o.id
    """,
)


async def replay(
    conn: asyncpg.Connection,
    tenant: str,
    subscription_id: uuid.UUID,
    ids: Sequence[int],
    *,
    all_failed: bool,
) -> int:
    """Makes deliveries due again now, with a fresh retry window; returns how many."""
    rows = await _REPLAY.fetch(
        conn,
        tenant=tenant,
        subscription_id=subscription_id,
        ids=list(ids),
        all_failed=all_failed,
    )
    return len(rows)


_ANY = Query("any_webhook", "SELECT EXISTS (SELECT 1 FROM webhook_subscriptions)")


async def any_subscription(conn: asyncpg.Connection) -> bool:
    """Whether any tenant has a subscription (the deliverer wakes for commits only then)."""
    return bool(await _ANY.fetchval(conn))
