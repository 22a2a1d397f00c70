"""SQL for the ``tasks`` table (and the ``task_attempts`` rows that move with it).

Every statement is plain, parameterised SQL taking arrays (``unnest``) so one round trip
serves a whole batch. Every statement filters by tenant, except the maintenance sweeps
(promotion, lease reaping) which act for all tenants by design.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.validation import ListFilter, NewTask

PENDING, SCHEDULED, RUNNING, SUCCEEDED, DEAD, CANCELLED = 1, 2, 3, 4, 5, 6
OUTCOME_RUNNING, OUTCOME_SUCCEEDED, OUTCOME_FAILED = 1, 2, 3
OUTCOME_TIMED_OUT, OUTCOME_LEASE_EXPIRED, OUTCOME_CANCELLED = 4, 5, 6

TASK_COLUMNS = """
    t.id, t.tenant, t.queue, t.type, t.payload, t.content_type, t.state, t.priority,
    t.attempt, t.max_attempts, t.attempt_base, t.idempotency_key, t.run_at, t.timeout_ms,
    t.retry_initial_ms, t.retry_max_ms, t.retry_multiplier, t.retry_jitter, t.labels,
    t.traceparent, t.result, t.last_error, t.worker_id, t.lease_epoch, t.lease_start_time,
    t.create_time, t.update_time, t.finish_time
"""

# What an Assignment needs (convert.assignment_from_row): a claim returns no more, since
# decoding every column of every claimed row is a measurable share of dispatch.
CLAIM_COLUMNS = """
    t.id, t.queue, t.type, t.payload, t.content_type, t.priority, t.attempt, t.max_attempts,
    t.idempotency_key, t.timeout_ms, t.labels, t.traceparent, t.lease_epoch, t.create_time
"""

# Attempts left after this one: retry when the error allows and the budget is not spent.
_RETRY_LEFT = "(t.attempt - t.attempt_base) < t.max_attempts"
# Exponential backoff with jitter, capped; the exponent is bounded so power() cannot overflow.
_BACKOFF = """
    make_interval(secs => least(
        t.retry_max_ms::float8,
        t.retry_initial_ms * power(t.retry_multiplier, least(t.attempt - t.attempt_base - 1, 64))
    ) * (1 - t.retry_jitter * random()) / 1000.0)
"""


async def insert(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str, uuid.UUID, NewTask, int, datetime]],
    now: datetime,
) -> set[uuid.UUID]:
    """Inserts (tenant, id, task, state, run_at) rows; returns the ids actually inserted.

    For rows with idempotency keys: a row whose key is taken is skipped, not an error (the
    caller compares it). Rows without keys go faster through copy_new().
    """
    inserted = await conn.fetch(
        f"""
        INSERT INTO tasks ({_INSERT_COLUMNS})
        SELECT {_INSERT_VALUES}, $20, $20
        FROM {_UNNEST_NEW}
        ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id
        """,
        *_new_columns(rows),
        now,
    )
    return {r["id"] for r in inserted}


async def insert_leased(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str, uuid.UUID, NewTask, int, datetime]],
    worker_ids: Sequence[str],
    fence: Fence,
    lease_seconds: float,
    now: datetime,
) -> None:
    """Inserts new tasks already RUNNING, each leased to its worker (attempt 1).

    The hand-off path: a fresh task goes straight to a waiting worker in the statement
    that commits it, instead of a second transaction claiming it. A dispatch-side write,
    so it carries the fence. No idempotency keys here (the caller keeps those apart).
    """
    await conn.execute(
        f"""
        INSERT INTO tasks ({_INSERT_COLUMNS}, attempt, worker_id, lease_epoch,
            lease_start_time, lease_expire_time)
        SELECT {_INSERT_VALUES}, $20, $20, 1, w.worker_id, $23, now(),
            now() + make_interval(secs => $21)
        FROM {_UNNEST_NEW}
        JOIN unnest($1::uuid[], $22::text[]) AS w(id, worker_id) ON w.id = r.id
        WHERE {Fence.sql(24)}
        """,
        *_new_columns(rows),
        now,
        lease_seconds,
        list(worker_ids),
        fence.epoch,
        *fence.params,
    )


_INSERT_COLUMNS = """
    id, tenant, queue, type, payload, content_type, state, priority, max_attempts,
    idempotency_key, request_hash, run_at, timeout_ms, retry_initial_ms, retry_max_ms,
    retry_multiplier, retry_jitter, labels, traceparent, create_time, update_time
"""
_INSERT_VALUES = """
    r.id, r.tenant, r.queue, r.type, r.payload, r.content_type, r.state, r.priority,
    r.max_attempts, r.idempotency_key, r.request_hash, r.run_at, r.timeout_ms,
    r.retry_initial_ms, r.retry_max_ms, r.retry_multiplier, r.retry_jitter,
    r.labels::jsonb, r.traceparent
"""
_UNNEST_NEW = """
    unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
        $7::smallint[], $8::int[], $9::int[], $10::text[], $11::bytea[], $12::timestamptz[],
        $13::bigint[], $14::bigint[], $15::bigint[], $16::float8[], $17::float8[],
        $18::text[], $19::text[])
    AS r(id, tenant, queue, type, payload, content_type, state, priority, max_attempts,
        idempotency_key, request_hash, run_at, timeout_ms, retry_initial_ms, retry_max_ms,
        retry_multiplier, retry_jitter, labels, traceparent)
"""


def _new_columns(
    rows: Sequence[tuple[str, uuid.UUID, NewTask, int, datetime]],
) -> list[list[object]]:
    """The 19 parameter arrays of _UNNEST_NEW for (tenant, id, task, state, run_at) rows."""
    cols: list[list[object]] = [[] for _ in range(19)]
    for tenant, task_id, task, state, run_at in rows:
        values = (
            task_id,
            tenant,
            task.queue,
            task.type,
            task.payload,
            task.content_type,
            state,
            task.priority,
            task.max_attempts,
            task.idempotency_key,
            task.request_hash or None,
            run_at,
            task.timeout_ms,
            task.retry_initial_ms,
            task.retry_max_ms,
            task.retry_multiplier,
            task.retry_jitter,
            json.dumps(task.labels) if task.labels else "{}",
            task.traceparent,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    return cols


_COPY_COLUMNS = (
    "id", "tenant", "queue", "type", "payload", "content_type", "state", "priority",
    "max_attempts", "run_at", "timeout_ms", "retry_initial_ms", "retry_max_ms",
    "retry_multiplier", "retry_jitter", "labels", "traceparent", "create_time", "update_time",
)  # fmt: skip


async def copy_new(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str, uuid.UUID, NewTask, int, datetime]],
    now: datetime,
) -> None:
    """Inserts (tenant, id, task, state, run_at) rows without idempotency keys with COPY.

    COPY encodes rows straight into the binary protocol, about half the client CPU of an
    INSERT over unnest() arrays; it needs no conflict handling because ids are new.
    """
    await conn.copy_records_to_table(
        "tasks",
        columns=_COPY_COLUMNS,
        records=[
            (
                task_id,
                tenant,
                task.queue,
                task.type,
                task.payload,
                task.content_type,
                state,
                task.priority,
                task.max_attempts,
                run_at,
                task.timeout_ms,
                task.retry_initial_ms,
                task.retry_max_ms,
                task.retry_multiplier,
                task.retry_jitter,
                json.dumps(task.labels) if task.labels else "{}",
                task.traceparent,
                now,
                now,
            )
            for tenant, task_id, task, state, run_at in rows
        ],
    )


async def find_by_idempotency_keys(
    conn: asyncpg.Connection, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], asyncpg.Record]:
    """Existing tasks by (tenant, idempotency_key), with their request_hash."""
    if not pairs:
        return {}
    rows = await conn.fetch(
        f"""
        SELECT {TASK_COLUMNS}, t.request_hash
        FROM tasks t
        JOIN unnest($1::text[], $2::text[]) AS k(tenant, key)
            ON t.tenant = k.tenant AND t.idempotency_key = k.key
        """,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return {(r["tenant"], r["idempotency_key"]): r for r in rows}


async def get(conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.tenant = $1 AND t.id = $2", tenant, task_id
    )


async def attempts(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        SELECT attempt, worker_id, start_time, end_time, outcome, error FROM task_attempts
        WHERE tenant = $1 AND task_id = $2
        UNION ALL
        SELECT attempt, worker_id, lease_start_time, NULL, {OUTCOME_RUNNING}, ''
        FROM tasks WHERE tenant = $1 AND id = $2 AND state = {RUNNING}
        ORDER BY attempt
        """,
        tenant,
        task_id,
    )


async def list_page(conn: asyncpg.Connection, tenant: str, flt: ListFilter) -> list[asyncpg.Record]:
    """Newest first; fetches one row more than the page to tell whether another page exists."""
    return await conn.fetch(
        f"""
        SELECT {TASK_COLUMNS} FROM tasks t
        WHERE t.tenant = $1
          AND ($2::text IS NULL OR t.queue = $2)
          AND ($3::smallint IS NULL OR t.state = $3)
          AND ($4::text IS NULL OR t.type = $4)
          AND ($5::uuid IS NULL OR t.id < $5)
        ORDER BY t.id DESC
        LIMIT $6
        """,
        tenant,
        flt.queue,
        flt.state,
        flt.type,
        flt.after_id,
        flt.page_size + 1,
    )


async def claim(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    queues: Sequence[str],
    types: Sequence[str],
    limit: int,
    worker_id: str,
    fence: Fence,
    lease_seconds: float,
) -> list[asyncpg.Record]:
    """Leases up to ``limit`` ready tasks to one worker (the attempt is the task row).

    ``types`` empty means any type. SKIP LOCKED keeps concurrent claimers off each other.
    """
    return await conn.fetch(
        f"""
        WITH picked AS (
            -- Per queue, the head of the ready index in dispatch order; then the best of
            -- those heads. Written so that the index gives the order whatever the
            -- planner's (always stale, on a queue table) statistics say.
            SELECT head.id, head.priority FROM unnest($2::text[]) AS q(name)
            CROSS JOIN LATERAL (
                SELECT id, priority FROM tasks
                WHERE tenant = $1 AND state = {PENDING} AND queue = q.name
                  AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))
                ORDER BY priority DESC, id
                LIMIT $4
                FOR UPDATE SKIP LOCKED
            ) AS head
            WHERE {Fence.sql(8)}
            ORDER BY head.priority DESC, head.id
            LIMIT $4
        ), leased AS (
            UPDATE tasks t
            SET state = {RUNNING}, attempt = t.attempt + 1, worker_id = $5, lease_epoch = $6,
                lease_start_time = now(),
                lease_expire_time = now() + make_interval(secs => $7), update_time = now()
            FROM picked WHERE t.id = picked.id
            RETURNING {CLAIM_COLUMNS}
        )
        SELECT * FROM leased ORDER BY priority DESC, id
        """,
        tenant,
        list(queues),
        list(types),
        limit,
        worker_id,
        fence.epoch,
        lease_seconds,
        *fence.params,
    )


@dataclass(frozen=True)
class LeaseRef:
    """One lease as a worker names it, with who is asking."""

    tenant: str
    task_id: str  # canonical lowercase text
    attempt: int
    epoch: int
    worker_id: str


def _lease_arrays(leases: Sequence[LeaseRef]) -> list[list[object]]:
    return [
        [x.tenant for x in leases],
        [x.task_id for x in leases],
        [x.attempt for x in leases],
        [x.epoch for x in leases],
        [x.worker_id for x in leases],
    ]


_LEASE_MATCH = """
    t.tenant = r.tenant AND t.id = r.id AND t.attempt = r.attempt AND t.lease_epoch = r.epoch
    AND t.worker_id = r.worker_id AND t.state = 3
"""


async def renew_leases(
    conn: asyncpg.Connection, leases: Sequence[LeaseRef], lease_seconds: float, fence: Fence
) -> set[tuple[str, int]]:
    """Extends the leases still held; returns (task_id, attempt) of those renewed."""
    rows = await conn.fetch(
        f"""
        UPDATE tasks t SET lease_expire_time = now() + make_interval(secs => $6)
        FROM unnest($1::text[], $2::uuid[], $3::int[], $4::bigint[], $5::text[])
            AS r(tenant, id, attempt, epoch, worker_id)
        WHERE {Fence.sql(7)} AND {_LEASE_MATCH}
        RETURNING t.id::text AS id, t.attempt
        """,
        *_lease_arrays(leases),
        lease_seconds,
        *fence.params,
    )
    return {(r["id"], r["attempt"]) for r in rows}


@dataclass(frozen=True)
class Outcome:
    """The end of one attempt as a worker reported it."""

    lease: LeaseRef
    outcome: int  # an AttemptOutcome number
    result: bytes | None
    error: str
    retryable: bool


async def finish_attempts(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], fence: Fence
) -> list[asyncpg.Record]:
    """Applies results whose lease is current; returns (id, tenant, queue, state) of those applied.

    Success -> SUCCEEDED. Failure -> SCHEDULED after a backoff when retryable with attempts
    left, else DEAD. The attempt row is closed in the same statement.
    """
    leases = [o.lease for o in outcomes]
    return await conn.fetch(
        f"""
        WITH r AS (
            SELECT * FROM unnest($1::text[], $2::uuid[], $3::int[], $4::bigint[], $5::text[],
                $6::smallint[], $7::bytea[], $8::text[], $9::bool[])
                AS r(tenant, id, attempt, epoch, worker_id, outcome, result, error, retryable)
        ), applied AS (
            UPDATE tasks t SET
                state = CASE
                    WHEN r.outcome = {OUTCOME_SUCCEEDED} THEN {SUCCEEDED}
                    WHEN r.retryable AND {_RETRY_LEFT} THEN {SCHEDULED}
                    ELSE {DEAD} END,
                run_at = CASE
                    WHEN r.outcome <> {OUTCOME_SUCCEEDED} AND r.retryable AND {_RETRY_LEFT}
                    THEN now() + {_BACKOFF} ELSE t.run_at END,
                finish_time = CASE
                    WHEN r.outcome = {OUTCOME_SUCCEEDED} OR NOT (r.retryable AND {_RETRY_LEFT})
                    THEN now() END,
                result = r.result,
                last_error = CASE WHEN r.outcome = {OUTCOME_SUCCEEDED} THEN t.last_error
                    ELSE r.error END,
                worker_id = NULL, lease_expire_time = NULL, update_time = now()
            FROM r
            WHERE {Fence.sql(10)} AND {_LEASE_MATCH}
            RETURNING t.id, t.tenant, t.queue, t.state, t.run_at, t.attempt, t.lease_epoch,
                t.lease_start_time, r.worker_id, r.outcome, r.error
        ), closed AS (
            INSERT INTO task_attempts (task_id, attempt, tenant, worker_id, epoch, start_time,
                end_time, outcome, error)
            SELECT id, attempt, tenant, worker_id, lease_epoch, lease_start_time, now(), outcome,
                error
            FROM applied
        )
        SELECT id::text AS id, tenant, queue, state, run_at FROM applied
        """,
        *_lease_arrays(leases),
        [o.outcome for o in outcomes],
        [o.result for o in outcomes],
        [o.error for o in outcomes],
        [o.retryable for o in outcomes],
        *fence.params,
    )


async def record_refused(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], reason: str
) -> None:
    leases = [o.lease for o in outcomes]
    await conn.execute(
        """
        INSERT INTO refused_results (tenant, task_id, attempt, epoch, worker_id, outcome, reason)
        SELECT tenant, id, attempt, epoch, worker_id, outcome, $7
        FROM unnest($1::text[], $2::uuid[], $3::int[], $4::bigint[], $5::text[], $6::smallint[])
            AS r(tenant, id, attempt, epoch, worker_id, outcome)
        """,
        *_lease_arrays(leases),
        [o.outcome for o in outcomes],
        reason,
    )


_RELEASE = f"""
    UPDATE tasks t SET
        state = CASE WHEN {_RETRY_LEFT} THEN {PENDING} ELSE {DEAD} END,
        finish_time = CASE WHEN {_RETRY_LEFT} THEN NULL ELSE now() END,
        last_error = $ERROR, worker_id = NULL, lease_expire_time = NULL, update_time = now()
    FROM victims WHERE t.id = victims.id
    RETURNING t.id, t.tenant, t.queue, t.state, t.attempt, t.last_error, t.lease_epoch,
        t.lease_start_time, victims.worker_id
"""
# Records the attempts a _RELEASE ended, as LEASE_EXPIRED.
_CLOSE_RELEASED = f"""
    INSERT INTO task_attempts (task_id, attempt, tenant, worker_id, epoch, start_time, end_time,
        outcome, error)
    SELECT id, attempt, tenant, worker_id, lease_epoch, lease_start_time, now(),
        {OUTCOME_LEASE_EXPIRED}, last_error
    FROM released
"""


async def reap_expired(conn: asyncpg.Connection, limit: int, fence: Fence) -> list[asyncpg.Record]:
    """Takes back leases that expired: the task is PENDING again (DEAD when out of attempts)."""
    release = _RELEASE.replace(
        "$ERROR",
        "'lease expired: worker ' || coalesce(t.worker_id, '?') || ' stopped heartbeating'",
    )
    return await conn.fetch(
        f"""
        WITH victims AS (
            SELECT id, worker_id FROM tasks
            WHERE {Fence.sql(2)} AND state = {RUNNING} AND lease_expire_time < now()
            ORDER BY lease_expire_time LIMIT $1 FOR UPDATE SKIP LOCKED
        ), released AS ({release}), closed AS ({_CLOSE_RELEASED})
        SELECT id, tenant, queue, state FROM released
        """,
        limit,
        *fence.params,
    )


async def release_abandoned(
    conn: asyncpg.Connection,
    tenant: str,
    worker_id: str,
    keep: Sequence[tuple[str, int]],
) -> list[asyncpg.Record]:
    """Takes back tasks leased to ``worker_id`` that the worker says it is not running.

    Called when a worker (re)connects: it lists its in-flight tasks, so any other lease it
    holds was lost on the way (assigned to a stream that broke) and can run elsewhere now.
    """
    release = _RELEASE.replace("$ERROR", "'worker ' || $2 || ' reconnected without this task'")
    return await conn.fetch(
        f"""
        WITH victims AS (
            SELECT id, worker_id FROM tasks t
            WHERE t.tenant = $1 AND t.worker_id = $2 AND t.state = {RUNNING}
              AND (t.id, t.attempt) NOT IN (
                  SELECT * FROM unnest($3::uuid[], $4::int[]))
            FOR UPDATE
        ), released AS ({release}), closed AS ({_CLOSE_RELEASED})
        SELECT id, tenant, queue, state FROM released
        """,
        tenant,
        worker_id,
        [k[0] for k in keep],
        [k[1] for k in keep],
    )


async def promote_due(conn: asyncpg.Connection, limit: int, fence: Fence) -> list[asyncpg.Record]:
    """Makes SCHEDULED tasks whose run_at has come PENDING; returns their (id, tenant, queue)."""
    return await conn.fetch(
        f"""
        UPDATE tasks t SET state = {PENDING}, update_time = now()
        FROM (
            SELECT id FROM tasks
            WHERE {Fence.sql(2)} AND state = {SCHEDULED} AND run_at <= now()
            ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED
        ) due
        WHERE t.id = due.id
        RETURNING t.id, t.tenant, t.queue
        """,
        limit,
        *fence.params,
    )


async def next_run_at(conn: asyncpg.Connection) -> datetime | None:
    value: datetime | None = await conn.fetchval(
        f"SELECT min(run_at) FROM tasks WHERE state = {SCHEDULED}"
    )
    return value


async def cancel(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID
) -> asyncpg.Record | None:
    """Cancels a non-terminal task; returns its previous state and lease, None if none changed."""
    return await conn.fetchrow(
        f"""
        WITH old AS (
            SELECT id, tenant, state, worker_id, attempt, lease_epoch, lease_start_time FROM tasks
            WHERE tenant = $1 AND id = $2 FOR UPDATE
        ), cancelled AS (
            UPDATE tasks t SET state = {CANCELLED}, finish_time = now(), update_time = now(),
                worker_id = NULL, lease_expire_time = NULL
            FROM old WHERE t.id = old.id AND old.state IN ({PENDING}, {SCHEDULED}, {RUNNING})
            RETURNING t.id
        ), closed AS (
            INSERT INTO task_attempts (task_id, attempt, tenant, worker_id, epoch, start_time,
                end_time, outcome, error)
            SELECT old.id, old.attempt, old.tenant, old.worker_id, old.lease_epoch,
                old.lease_start_time, now(), {OUTCOME_CANCELLED}, 'cancelled'
            FROM old JOIN cancelled ON cancelled.id = old.id
            WHERE old.state = {RUNNING}
        )
        SELECT old.state, old.worker_id, old.attempt, old.lease_epoch
        FROM old JOIN cancelled ON cancelled.id = old.id
        """,
        tenant,
        task_id,
    )


async def redrive(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID
) -> asyncpg.Record | None:
    """Makes a DEAD task PENDING with a fresh attempt budget; None if it is not DEAD."""
    return await conn.fetchrow(
        f"""
        UPDATE tasks t SET state = {PENDING}, attempt_base = t.attempt, run_at = now(),
            finish_time = NULL, result = NULL, update_time = now()
        WHERE t.tenant = $1 AND t.id = $2 AND t.state = {DEAD}
        RETURNING {TASK_COLUMNS}
        """,
        tenant,
        task_id,
    )


async def queue_stats(conn: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""
        SELECT queue,
            count(*) FILTER (WHERE state = {PENDING}) AS pending,
            count(*) FILTER (WHERE state = {SCHEDULED}) AS scheduled,
            count(*) FILTER (WHERE state = {RUNNING}) AS running,
            count(*) FILTER (WHERE state = {DEAD}) AS dead
        FROM tasks
        WHERE tenant = $1 AND state IN ({PENDING}, {SCHEDULED}, {RUNNING}, {DEAD})
        GROUP BY queue ORDER BY queue
        """,
        tenant,
    )
