"""SQL for the ``tasks`` table and the ``task_attempts`` rows that move with it.

Every statement takes arrays (``unnest``) so one round trip serves a whole batch, and every
statement filters by tenant, except the maintenance sweeps (promotion, lease reaping) which
act for all tenants by design. Dispatch-side writes carry the leader's fence (``{fence}``,
see ``sql.py``). Every statement that changes a task's state returns the one row shape
of ``transitions.py`` (its ``changed`` CTE and tail), which the after-commit path hands to
its listeners. The claim is here too; the dispatch policy (``dispatch/policy.py``) decides
whom it claims for and how much.

What counts as an attempt (``attempt`` counts every lease, ``attempt_base`` the ones that do
not count; attempts left = ``max_attempts - (attempt - attempt_base)``):

- a lease that ends in a result counts, except TASK_OUTCOME_INTERRUPTED (the worker's
  drain ran out of time): the task is PENDING again at once, attempt row INTERRUPTED; and
  TASK_OUTCOME_KEY_UNAVAILABLE (the worker lacks the payload's encryption key, so the
  handler never ran): PENDING again at once, attempt row NOT_STARTED;
- a lease that *expired* counts (the worker went silent: the task may have run), and so
  does a lease taken back from an evicted worker that had received it: LEASE_EXPIRED;
- a lease that never started does not count: claimed or handed off but never written to
  the worker's stream (the stream broke, the session was replaced or evicted first), or
  left out of the worker's ``Hello.in_flight`` when it reconnects (a worker lists every
  lease it holds: running, waiting for a slot, or finished with an unacknowledged
  result). The task is PENDING again at once, attempt row NOT_STARTED. Only the process
  the lease was granted to can say so: its Hello carries the resume token whose hash is
  the row's ``lease_holder``. A lease of the worker id held by another process (another
  token, or none: a new process took a free id) counts (LEASE_EXPIRED): it may have run;
- RetryTask gives a fresh budget: ``attempt_base = attempt``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg

from conveyor.coordinator.api.validation import ListFilter, NewTask
from conveyor.coordinator.store import transitions
from conveyor.coordinator.store.sql import FENCE, Fence, Query, columns, transpose, unnest
from conveyor.coordinator.store.transitions import TAIL, TAIL_NOT_FINISHING, changed, tail
from conveyor.transport._encryption import ENCRYPTED_CONTENT_TYPE, envelope_key_id
from conveyor.v1 import task_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.lifecycle.leases import LeaseKey

UNSPECIFIED = task_pb2.TASK_STATE_UNSPECIFIED
"""The state "before" of a task just inserted."""
PENDING = task_pb2.TASK_STATE_PENDING
SCHEDULED = task_pb2.TASK_STATE_SCHEDULED
RUNNING = task_pb2.TASK_STATE_RUNNING
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
DEAD = task_pb2.TASK_STATE_DEAD
CANCELLED = task_pb2.TASK_STATE_CANCELLED
BLOCKED = task_pb2.TASK_STATE_BLOCKED
UNFINISHED = (PENDING, SCHEDULED, RUNNING, BLOCKED)
TERMINAL = frozenset({SUCCEEDED, DEAD, CANCELLED})

OUTCOME_RUNNING = task_pb2.ATTEMPT_OUTCOME_RUNNING
OUTCOME_SUCCEEDED = task_pb2.ATTEMPT_OUTCOME_SUCCEEDED
OUTCOME_FAILED = task_pb2.ATTEMPT_OUTCOME_FAILED
OUTCOME_TIMED_OUT = task_pb2.ATTEMPT_OUTCOME_TIMED_OUT
OUTCOME_LEASE_EXPIRED = task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED
OUTCOME_CANCELLED = task_pb2.ATTEMPT_OUTCOME_CANCELLED
OUTCOME_NOT_STARTED = task_pb2.ATTEMPT_OUTCOME_NOT_STARTED
OUTCOME_INTERRUPTED = task_pb2.ATTEMPT_OUTCOME_INTERRUPTED

FIRST_ATTEMPT = 1
"""The attempt number of a task's first lease (``attempt`` counts leases, from 1)."""

# -- columns -------------------------------------------------------------------------------

TASK_COLUMNS = (
    "id", "tenant", "queue", "type", "payload", "content_type", "state", "priority",
    "attempt", "max_attempts", "attempt_base", "idempotency_key", "run_at", "timeout_ms",
    "retry_initial_ms", "retry_max_ms", "retry_multiplier", "retry_jitter", "labels",
    "traceparent", "result", "last_error", "worker_id", "lease_epoch", "lease_start_time",
    "create_time", "update_time", "finish_time", "version", "concurrency_key",
    "concurrency_limit", "deadline",
)  # fmt: skip
"""Every column a Task message shows (convert.task_from_row)."""

ASSIGNMENT_COLUMNS = (
    "payload", "content_type", "priority", "max_attempts", "idempotency_key", "timeout_ms",
    "labels", "traceparent",
)  # fmt: skip
"""What an Assignment needs (convert.add_assignment_from_row) beyond a transition row and
``create_time``: a claim returns no more, since decoding every column of every claimed row
is a measurable share of dispatch."""

NEW_TASK_ARRAYS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"), ("tenant", "text"), ("queue", "text"), ("type", "text"),
    ("payload", "bytea"), ("content_type", "text"), ("state", "smallint"),
    ("priority", "int"), ("max_attempts", "int"), ("idempotency_key", "text"),
    ("request_hash", "bytea"), ("run_at", "timestamptz"), ("timeout_ms", "bigint"),
    ("retry_initial_ms", "bigint"), ("retry_max_ms", "bigint"),
    ("retry_multiplier", "float8"), ("retry_jitter", "float8"), ("labels", "text"),
    ("traceparent", "text"), ("encryption_key", "text"), ("concurrency_key", "text"),
    ("concurrency_limit", "int"), ("deadline", "timestamptz"),
)  # fmt: skip
"""The columns a new task is written with (in :func:`new_row_values` order), and their types."""
NEW_TASK_COLUMNS = tuple(name for name, _ in NEW_TASK_ARRAYS)

ATTEMPT_COLUMNS = (
    "task_id", "attempt", "tenant", "worker_id", "epoch", "start_time", "end_time", "outcome",
    "error",
)  # fmt: skip

_TASK = columns(TASK_COLUMNS, "t")
_NEW_VALUES = ", ".join(f"r.{n}::jsonb" if n == "labels" else f"r.{n}" for n in NEW_TASK_COLUMNS)
KEY_ARRAYS: tuple[tuple[str, str], ...] = (
    ("tenant", "text"),
    ("id", "uuid"),
    ("attempt", "int"),
    ("epoch", "bigint"),
    ("worker_id", "text"),
)
"""A lease key's fields (``leases.LeaseKey``, in its order) as array parameters."""


def key_arrays(keys: Sequence[LeaseKey]) -> dict[str, Any]:
    """Lease keys as the array parameters named in :data:`KEY_ARRAYS`."""
    if not keys:
        return {name: [] for name, _ in KEY_ARRAYS}
    values = zip(*keys, strict=True)
    return {name: list(column) for (name, _), column in zip(KEY_ARRAYS, values, strict=True)}


_KEYS = unnest(KEY_ARRAYS, "r")
# The same, numbered from 0 (r.i): a statement returns the positions of the keys it matched.
_NUMBERED_KEYS = unnest(KEY_ARRAYS, "r", numbered=True)
# A lease as a worker names it (r, from _KEYS) matches the task row only while current.
_LEASE_MATCH = f"""
    t.tenant = r.tenant AND t.id = r.id AND t.attempt = r.attempt AND t.lease_epoch = r.epoch
    AND t.worker_id = r.worker_id AND t.state = {RUNNING}
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


# Seconds from a timestamp column to now, computed by the database. Never negative: some
# timestamps come from the coordinator's clock, which may run ahead.
_SECONDS_SINCE = "greatest(0, extract(epoch FROM now() - {}))::float8"


class NewRow(NamedTuple):
    """A task about to be inserted."""

    tenant: str
    id: uuid.UUID | str
    """Made here (a UUID) or by the client (canonical text): asyncpg encodes both."""
    task: NewTask
    state: int
    run_at: datetime


def encryption_key(task: NewTask) -> str | None:
    """The key id an encrypted payload's envelope names, read from its header (no
    cryptography): dispatch gives the task only to a worker that holds it. None for any
    other payload, and for an envelope whose header does not parse (a worker fails that)."""
    return envelope_key_id(task.payload) if task.content_type == ENCRYPTED_CONTENT_TYPE else None


def new_row_values(row: NewRow, *tail: object) -> tuple[object, ...]:
    """The row's values in NEW_TASK_COLUMNS order, then ``tail``."""
    task = row.task
    return (
        row.id,
        row.tenant,
        task.queue,
        task.type,
        task.payload,
        task.content_type,
        row.state,
        task.priority,
        task.max_attempts,
        task.idempotency_key,
        task.request_hash or None,
        row.run_at,
        task.timeout_ms,
        task.retry_initial_ms,
        task.retry_max_ms,
        task.retry_multiplier,
        task.retry_jitter,
        json.dumps(task.labels) if task.labels else "{}",
        task.traceparent,
        # encryption_key(task), inline: a call per submitted task is measurable here.
        envelope_key_id(task.payload) if task.content_type == ENCRYPTED_CONTENT_TYPE else None,
        task.concurrency_key,
        task.concurrency_limit,
        task.deadline,
        *tail,
    )


def _new_arrays(rows: Sequence[NewRow]) -> dict[str, Any]:
    return transpose([new_row_values(r) for r in rows], NEW_TASK_COLUMNS)


# -- submits -------------------------------------------------------------------------------

_INSERT = Query(
    "insert_tasks",
    f"""
    WITH changed AS (
        INSERT INTO tasks AS t ({columns(NEW_TASK_COLUMNS)}, create_time, update_time)
        SELECT {_NEW_VALUES}, :now, :now
        FROM {unnest(NEW_TASK_ARRAYS, "r")}
        ON CONFLICT DO NOTHING
        RETURNING {changed(from_state=UNSPECIFIED)}
    ) {TAIL_NOT_FINISHING}
    """,
)


async def insert(
    conn: asyncpg.Connection, rows: Sequence[NewRow], now: datetime
) -> list[asyncpg.Record]:
    """Inserts rows; returns the transitions of those actually inserted.

    A row whose idempotency key or id (a client-made request_id) is taken is skipped, not
    an error (the caller looked them up first and compares). Large batches without keys
    go faster through :func:`copy_new`.
    """
    return await _INSERT.fetch(conn, now=now, **_new_arrays(rows))


_INSERT_NEW = Query(
    "insert_new_tasks",
    f"""
    WITH changed AS (
        INSERT INTO tasks AS t ({columns(NEW_TASK_COLUMNS)}, create_time, update_time)
        SELECT {_NEW_VALUES}, :now, :now
        FROM {unnest(NEW_TASK_ARRAYS, "r")}
        RETURNING {changed(from_state=UNSPECIFIED)}
    ) {TAIL_NOT_FINISHING}
    """,
)


async def insert_new(
    conn: asyncpg.Connection, rows: Sequence[NewRow], now: datetime
) -> list[asyncpg.Record]:
    """Inserts rows without idempotency keys; like :func:`copy_new`, the statement fails as
    a whole (UniqueViolationError) when an id is taken, which only a client-made id can be.
    For small batches, where COPY's extra round trip costs more than it saves. Returns
    the transitions."""
    return await _INSERT_NEW.fetch(conn, now=now, **_new_arrays(rows))


_INSERT_LEASED = Query(
    "insert_leased_tasks",
    f"""
    WITH changed AS (
        INSERT INTO tasks AS t ({columns(NEW_TASK_COLUMNS)}, create_time, update_time,
            attempt, worker_id, lease_holder, lease_epoch, lease_start_time, lease_expire_time)
        SELECT {_NEW_VALUES}, :now, :now, :attempt, w.worker_id, w.holder, :epoch, now(),
            now() + make_interval(secs => :lease_seconds)
        FROM {unnest(NEW_TASK_ARRAYS, "r")}
        JOIN unnest(:id::uuid[], :worker_ids::text[], :holders::bytea[])
            AS w(id, worker_id, holder) ON w.id = r.id
        WHERE {FENCE}
        RETURNING {changed(from_state=UNSPECIFIED)}, t.traceparent
    ) {tail("traceparent", finishes=False)}
    """,
)


async def insert_leased(
    conn: asyncpg.Connection,
    rows: Sequence[NewRow],
    worker_ids: Sequence[str],
    holders: Sequence[bytes],
    fence: Fence,
    lease_seconds: float,
    now: datetime,
) -> list[asyncpg.Record]:
    """Inserts new tasks already RUNNING, each leased to its worker (its first attempt,
    :data:`FIRST_ATTEMPT`, under ``fence.epoch``); ``holders`` are the workers' lease
    holders (``sessions.WorkerSession.holder``).

    The hand-off path: a fresh task goes straight to a waiting worker in the statement
    that commits it, instead of a second transaction claiming it. A dispatch-side write,
    so it carries the fence. No idempotency keys here (the caller keeps those apart).
    Returns the transitions, with ``traceparent``, in no particular order.
    """
    return await _INSERT_LEASED.fetch(
        conn,
        now=now,
        attempt=FIRST_ATTEMPT,
        worker_ids=list(worker_ids),
        holders=list(holders),
        epoch=fence.epoch,
        lease_seconds=lease_seconds,
        fence=fence,
        **_new_arrays([r._replace(state=RUNNING) for r in rows]),
    )


COPY_USABLE = transitions.COPY_USABLE
"""COPY carries no CTE: it is used only while every fragment that runs on inserts can run
after it, over what the COPY wrote (``transitions.after_copy``)."""
_AFTER_COPY_SQL = transitions.after_copy()
_AFTER_COPY = Query("after_copy", _AFTER_COPY_SQL) if _AFTER_COPY_SQL else None
_AFTER_COPY_GATE_SQL = transitions.after_copy_gate()
_AFTER_COPY_GATE = Query("after_copy_gate", _AFTER_COPY_GATE_SQL) if _AFTER_COPY_GATE_SQL else None


COPY_SLICE = 50
"""Rows a COPY encodes between two yields to the event loop (asyncpg encodes an async
iterable's rows as they come): 500 rows are a few milliseconds of encoding that would
hold every other call."""


async def _in_slices(records: Sequence[tuple[object, ...]]) -> AsyncIterator[tuple[object, ...]]:
    for start in range(0, len(records), COPY_SLICE):
        if start:
            await asyncio.sleep(0)
        for record in records[start : start + COPY_SLICE]:
            yield record


async def copy_new(
    conn: asyncpg.Connection, rows: Sequence[NewRow], now: datetime
) -> list[tuple[Any, ...]]:
    """Inserts rows without idempotency keys with COPY; returns their transitions (made
    here: COPY returns nothing). Only while :data:`COPY_USABLE`.

    COPY encodes rows straight into the binary protocol, about half the client CPU of an
    INSERT over unnest() arrays. It has no conflict handling: a taken id (only a client-made
    one can be) fails the whole COPY with UniqueViolationError, writing nothing.
    """
    records = [new_row_values(r, now, now) for r in rows]
    await conn.copy_records_to_table(
        "tasks",
        columns=(*NEW_TASK_COLUMNS, "create_time", "update_time"),
        records=records if len(records) <= COPY_SLICE else _in_slices(records),
    )
    if _AFTER_COPY is not None and (
        _AFTER_COPY_GATE is None
        or await _AFTER_COPY_GATE.fetchval(conn, tenants=list({r.tenant for r in rows}))
    ):
        # The fragments, in the same transaction: one more round trip per COPY (batches
        # of COPY_THRESHOLD tasks and more) when the gate says they have work, else a
        # small query instead of the arrays (measured: about 0.4 ms against 12 for the
        # arrays of 500 tasks, on this machine).
        await _AFTER_COPY.execute(
            conn,
            id=[r.id for r in rows],
            tenant=[r.tenant for r in rows],
            queue=[r.task.queue for r in rows],
            type=[r.task.type for r in rows],
            from_state=[UNSPECIFIED] * len(rows),
            state=[r.state for r in rows],
            attempt=[0] * len(rows),
        )
    return [
        (str(r.id), r.tenant, r.task.queue, r.task.type, UNSPECIFIED, r.state, 0, None, None,
         None, r.run_at, None, None, None, None)
        for r in rows
    ]  # fmt: skip


_BY_KEYS = Query(
    "tasks_by_idempotency_keys",
    f"""
    SELECT {_TASK}, t.request_hash
    FROM tasks t
    JOIN unnest(:tenants::text[], :keys::text[]) AS k(tenant, key)
        ON t.tenant = k.tenant AND t.idempotency_key = k.key
    """,
)


# The tasks a submit may repeat, in one round trip: by idempotency key, then by id.
_PRIORS = Query(
    "tasks_by_keys_and_ids",
    f"""
    SELECT {_TASK}, t.request_hash, true AS by_key
    FROM tasks t
    JOIN unnest(:tenants::text[], :keys::text[]) AS k(tenant, key)
        ON t.tenant = k.tenant AND t.idempotency_key = k.key
    UNION ALL
    SELECT {_TASK}, t.request_hash, false AS by_key FROM tasks t WHERE t.id = ANY(:ids::uuid[])
    """,
)


async def find_priors(
    conn: asyncpg.Connection, pairs: Sequence[tuple[str, str]], ids: Sequence[str]
) -> tuple[dict[tuple[str, str], asyncpg.Record], dict[str, asyncpg.Record]]:
    """Existing tasks by (tenant, idempotency_key) and by id (canonical text), with their
    request_hash. By id of any tenant (the caller checks the tenant): client-made ids
    (request_id) that an earlier send may have written."""
    by_key: dict[tuple[str, str], asyncpg.Record] = {}
    by_id: dict[str, asyncpg.Record] = {}
    if not pairs and not ids:
        return by_key, by_id
    rows = await _PRIORS.fetch(
        conn, tenants=[p[0] for p in pairs], keys=[p[1] for p in pairs], ids=list(ids)
    )
    for row in rows:
        if row["by_key"]:
            by_key[(row["tenant"], row["idempotency_key"])] = row
        else:
            by_id[str(row["id"])] = row
    return by_key, by_id


async def find_by_idempotency_keys(
    conn: asyncpg.Connection, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], asyncpg.Record]:
    """Existing tasks by (tenant, idempotency_key), with their request_hash."""
    if not pairs:
        return {}
    rows = await _BY_KEYS.fetch(conn, tenants=[p[0] for p in pairs], keys=[p[1] for p in pairs])
    return {(r["tenant"], r["idempotency_key"]): r for r in rows}


_TAKE_BACK = Query(
    "take_back_tasks",
    """
    WITH events AS (DELETE FROM webhook_outbox WHERE task_id = ANY(:ids::uuid[]))
    DELETE FROM tasks WHERE id = ANY(:ids::uuid[])
    """,
)


async def take_back(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> None:
    """Deletes rows this transaction inserted (a submit flush that must plan again):
    nobody else has seen them; nor the webhook events the outbox fragment wrote for them.
    (Their dependency edges go with them: ON DELETE CASCADE.)"""
    await _TAKE_BACK.execute(conn, ids=list(ids))


# -- reads ---------------------------------------------------------------------------------

_GET = Query("get_task", f"SELECT {_TASK} FROM tasks t WHERE t.tenant = :tenant AND t.id = :id")


async def get(conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID) -> asyncpg.Record | None:
    return await _GET.fetchrow(conn, tenant=tenant, id=task_id)


_GET_MANY = Query(
    "get_tasks",
    f"""
    SELECT {_TASK} FROM tasks t
    JOIN unnest(:tenant::text[], :id::uuid[]) AS k(tenant, id)
        ON t.tenant = k.tenant AND t.id = k.id
    """,
)


async def get_many(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]
) -> list[asyncpg.Record]:
    """The tasks named by (tenant, task id) that exist, in no particular order."""
    return await _GET_MANY.fetch(conn, tenant=[k[0] for k in keys], id=[k[1] for k in keys])


_ATTEMPTS = Query(
    "task_attempts",
    f"""
    SELECT attempt, worker_id, start_time, end_time, outcome, error FROM task_attempts
    WHERE tenant = :tenant AND task_id = :id
    UNION ALL
    SELECT attempt, worker_id, lease_start_time, NULL, {OUTCOME_RUNNING}, ''
    FROM tasks WHERE tenant = :tenant AND id = :id AND state = {RUNNING}
    ORDER BY attempt
    """,
)


async def attempts(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await _ATTEMPTS.fetch(conn, tenant=tenant, id=task_id)


_LIST_PAGE = Query(
    "list_tasks",
    f"""
    SELECT {_TASK} FROM tasks t
    WHERE t.tenant = :tenant
      AND (:queue::text IS NULL OR t.queue = :queue)
      AND (:state::smallint IS NULL OR t.state = :state)
      AND (:type::text IS NULL OR t.type = :type)
      AND (:after_id::uuid IS NULL OR t.id < :after_id)
      AND (:labels::jsonb IS NULL OR t.labels @> :labels)
      AND (:created_after::timestamptz IS NULL OR t.create_time >= :created_after)
      AND (:created_before::timestamptz IS NULL OR t.create_time < :created_before)
    ORDER BY t.id DESC
    LIMIT :limit
    """,
)


async def list_page(conn: asyncpg.Connection, tenant: str, flt: ListFilter) -> list[asyncpg.Record]:
    """Newest first; fetches one row more than the page to tell whether another page exists."""
    return await _LIST_PAGE.fetch(
        conn,
        tenant=tenant,
        queue=flt.queue,
        state=flt.state,
        type=flt.type,
        after_id=flt.after_id,
        labels=flt.labels,
        created_after=flt.created_after,
        created_before=flt.created_before,
        limit=flt.page_size + 1,
    )


# A tenant's queues, counted by state at a cost bounded by a cap, whatever the depth
# (docs/performance.md, issue 19, seventh round). The queues are found by loose index
# scans (one probe per queue: the next queue name after the last) over the partial
# indexes that lead with (tenant, queue): tasks_ready, tasks_scheduled_queue, tasks_dead;
# running tasks are read from tasks_leased, whose rows are bounded by the workers'
# capacity, not by the depth. Then each queue's PENDING, SCHEDULED and DEAD tasks are
# counted up to :limit (the cap + 1, so a count over the cap shows) on the same indexes,
# each in its index's order: only an index scan keeps that order, so the planner cannot
# take a bitmap scan, which would read every entry of the queue before the LIMIT
# (migration 0015). The PENDING rows come in dispatch order, and their run_at gives the
# oldest: exact when the count is under the cap.
_NEXT_QUEUE = """
    {name}(queue) AS (
        (SELECT queue FROM tasks WHERE tenant = :tenant AND state = {state}
         ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT t.queue FROM tasks t
                WHERE t.tenant = :tenant AND t.state = {state} AND t.queue > q.queue
                ORDER BY t.queue LIMIT 1)
        FROM {name} q WHERE q.queue IS NOT NULL
    )"""
_QUEUE_COUNTS = f"""
    SELECT q.queue, p.n AS pending, p.oldest AS oldest_pending, s.n AS scheduled,
        coalesce(r.n, 0) AS running, d.n AS dead
    FROM queues q
    LEFT JOIN running r ON r.queue = q.queue
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, min(run_at) AS oldest FROM (
            SELECT run_at FROM tasks
            WHERE tenant = :tenant AND queue = q.queue AND state = {PENDING}
            ORDER BY priority DESC, deadline, id LIMIT :limit
        ) ready
    ) p
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT FROM tasks
            WHERE tenant = :tenant AND queue = q.queue AND state = {SCHEDULED}
            ORDER BY run_at LIMIT :limit
        ) scheduled
    ) s
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT FROM tasks
            WHERE tenant = :tenant AND queue = q.queue AND state = {DEAD}
            ORDER BY id LIMIT :limit
        ) dead
    ) d
    ORDER BY q.queue
"""
_QUEUE_STATS = Query(
    "queue_stats",
    f"""
    WITH RECURSIVE
    {_NEXT_QUEUE.format(name="ready_queues", state=PENDING)},
    {_NEXT_QUEUE.format(name="scheduled_queues", state=SCHEDULED)},
    {_NEXT_QUEUE.format(name="dead_queues", state=DEAD)},
    running AS (
        SELECT queue, count(*) AS n FROM tasks
        WHERE tenant = :tenant AND state = {RUNNING} GROUP BY queue
    ),
    queues AS (
        SELECT queue FROM ready_queues WHERE queue IS NOT NULL
        UNION SELECT queue FROM scheduled_queues WHERE queue IS NOT NULL
        UNION SELECT queue FROM dead_queues WHERE queue IS NOT NULL
        UNION SELECT queue FROM running
    )
    {_QUEUE_COUNTS}
    """,
)
# PauseQueue and ResumeQueue answer with their one queue: the same counts, no search.
_ONE_QUEUE_STATS = Query(
    "one_queue_stats",
    f"""
    WITH running AS (
        SELECT queue, count(*) AS n FROM tasks
        WHERE tenant = :tenant AND queue = :queue AND state = {RUNNING} GROUP BY queue
    ),
    queues AS (SELECT :queue::text AS queue)
    {_QUEUE_COUNTS}
    """,
)


class QueueCounts(NamedTuple):
    """One queue's tasks by state, each count exact up to the cap it was taken with."""

    queue: str
    pending: int
    scheduled: int
    running: int
    """Exact: RUNNING tasks are bounded by the workers' capacity, and never capped."""
    dead: int
    pending_capped: bool
    """More than the cap are PENDING: ``pending`` is the cap, meaning "at least"."""
    scheduled_capped: bool
    dead_capped: bool
    oldest_pending: datetime | None
    """The oldest PENDING run_at: exact unless ``pending_capped``; then the oldest of the
    first cap + 1 in dispatch order (the queue's oldest is at least as old)."""


async def queue_stats(
    conn: asyncpg.Connection, tenant: str, cap: int, queue: str | None = None
) -> list[QueueCounts]:
    """The tenant's queues that hold PENDING, SCHEDULED, RUNNING or DEAD tasks, by name,
    with each count exact up to ``cap`` (>= 1) and capped beyond it; reads at most
    ``cap + 1`` index entries per queue and count (RUNNING: every running task of the
    tenant, a number bounded by the workers' capacity). With ``queue``: that queue
    alone, listed even when it holds no task."""
    if queue is None:
        rows = await _QUEUE_STATS.fetch(conn, tenant=tenant, limit=cap + 1)
    else:
        rows = await _ONE_QUEUE_STATS.fetch(conn, tenant=tenant, queue=queue, limit=cap + 1)
    return [
        QueueCounts(
            queue=r["queue"],
            pending=min(r["pending"], cap),
            scheduled=min(r["scheduled"], cap),
            running=r["running"],
            dead=min(r["dead"], cap),
            pending_capped=r["pending"] > cap,
            scheduled_capped=r["scheduled"] > cap,
            dead_capped=r["dead"] > cap,
            oldest_pending=r["oldest_pending"],
        )
        for r in rows
    ]


# One statement per state, so each reads its own partial index (tasks_ready,
# tasks_scheduled, tasks_leased, tasks_dead) instead of the whole table, which is mostly
# finished tasks. For metrics, at scrape time: all tenants.
_QUEUE_DEPTHS = Query(
    "queue_depths",
    f"""
    SELECT tenant, queue, {PENDING}::smallint AS state, count(*) AS n,
        {_SECONDS_SINCE.format("min(run_at)")} AS oldest
    FROM tasks WHERE state = {PENDING} GROUP BY tenant, queue
    UNION ALL
    SELECT tenant, queue, {SCHEDULED}, count(*), NULL FROM tasks WHERE state = {SCHEDULED}
    GROUP BY tenant, queue
    UNION ALL
    SELECT tenant, queue, {RUNNING}, count(*), NULL FROM tasks WHERE state = {RUNNING}
    GROUP BY tenant, queue
    UNION ALL
    SELECT tenant, queue, {DEAD}, count(*), NULL FROM tasks WHERE state = {DEAD}
    GROUP BY tenant, queue
    """,
)
_DEPTH_NAMES = {PENDING: "pending", SCHEDULED: "scheduled", RUNNING: "running", DEAD: "dead"}


class QueueDepthRow(NamedTuple):
    """Tasks of one (tenant, queue) by state, and the age of its oldest ready task."""

    tenant: str
    queue: str
    pending: int
    scheduled: int
    running: int
    dead: int
    oldest_pending_age_seconds: float | None
    """Seconds since the oldest PENDING task's run_at; None when none is pending."""


async def queue_depths(conn: asyncpg.Connection) -> list[QueueDepthRow]:
    """Every (tenant, queue) with unfinished or dead tasks, counted by state."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in await _QUEUE_DEPTHS.fetch(conn):
        counts = found.setdefault(
            (row["tenant"], row["queue"]),
            {"pending": 0, "scheduled": 0, "running": 0, "dead": 0, "oldest": None},
        )
        counts[_DEPTH_NAMES[row["state"]]] = row["n"]
        if row["oldest"] is not None:
            counts["oldest"] = row["oldest"]
    return [
        QueueDepthRow(
            tenant, queue, c["pending"], c["scheduled"], c["running"], c["dead"], c["oldest"]
        )
        for (tenant, queue), c in sorted(found.items())
    ]


# The autoscaling signal (KEDA's external scaler, ``conveyor worker --autoscale``): one
# statement per state, so each reads its partial index (tasks_ready by tenant and queue;
# tasks_leased, whose rows are bounded by the workers' capacity).
# No types: every type (a filter on the rows the partial indexes already found).
_OF_TYPES = "(cardinality(:types::text[]) = 0 OR type = ANY(:types::text[]))"
_BACKLOG = Query(
    "queue_backlog",
    f"""
    SELECT p.n AS pending, p.oldest, r.n AS running
    FROM (SELECT count(*) AS n, {_SECONDS_SINCE.format("min(run_at)")} AS oldest FROM tasks
          WHERE state = {PENDING} AND tenant = :tenant AND queue = ANY(:queues::text[])
            AND {_OF_TYPES}) p,
         (SELECT count(*) AS n FROM tasks
          WHERE state = {RUNNING} AND tenant = :tenant AND queue = ANY(:queues::text[])
            AND {_OF_TYPES}) r
    """,
)


class Backlog(NamedTuple):
    """The work waiting in some queues of one tenant, and the work running there."""

    pending: int
    running: int
    oldest_pending_age_seconds: float
    """Seconds since the oldest PENDING task's run_at; 0 when none is pending."""


async def queue_backlog(
    conn: asyncpg.Connection, tenant: str, queues: Sequence[str], types: Sequence[str] = ()
) -> Backlog:
    """Tasks PENDING and RUNNING in ``queues`` of ``tenant``, and the oldest pending age;
    only those of ``types`` when some are given (the work some workers could take)."""
    row = await _BACKLOG.fetchrow(conn, tenant=tenant, queues=list(queues), types=list(types))
    assert row is not None  # aggregates: always one row
    return Backlog(row["pending"], row["running"], row["oldest"] or 0.0)


_RUNNING_PER_WORKER = Query(
    "running_per_worker",
    f"""
    SELECT tenant, worker_id, count(*) AS running FROM tasks
    WHERE state = {RUNNING} AND worker_id = ANY(:worker_ids::text[])
    GROUP BY tenant, worker_id
    """,
)


async def running_per_worker(
    conn: asyncpg.Connection, worker_ids: Sequence[str]
) -> dict[tuple[str, str], int]:
    """Leases held per (tenant, worker id), for these workers."""
    rows = await _RUNNING_PER_WORKER.fetch(conn, worker_ids=list(worker_ids))
    return {(r["tenant"], r["worker_id"]): r["running"] for r in rows}


# Three partial indexes (tasks_ready, tasks_scheduled, tasks_leased) cover these states,
# so the count reads them and not the table.
_COUNT_UNFINISHED = Query(
    "count_unfinished",
    f"""
    SELECT (SELECT count(*) FROM tasks WHERE state = {PENDING})
         + (SELECT count(*) FROM tasks WHERE state = {SCHEDULED})
         + (SELECT count(*) FROM tasks WHERE state = {RUNNING})
    """,
)


async def count_unfinished(conn: asyncpg.Connection) -> int:
    """Tasks not finished yet (PENDING, SCHEDULED, RUNNING), all tenants."""
    return int(await _COUNT_UNFINISHED.fetchval(conn))


# -- leases: the claim ----------------------------------------------------------------------

# The dispatch order within a queue: priority, then earliest deadline (none: last), then
# age (ids are time-ordered). The order of the ready indexes, so a claim reads it off.
_ORDER = "priority DESC, deadline, id"
# A task whose deadline passed is not started (the deadline sweep makes it DEAD).
_BEFORE_DEADLINE = "AND (deadline IS NULL OR deadline > now())"

# The claimed rows in dispatch order, as the worker gets them.
_CLAIMED_ORDER = "changed.priority DESC, changed.deadline, changed.id"


def _lease_heads(order: str, claimed_order: str, extra: str = "") -> str:
    """The end of every claim: ``heads`` (id, size and the columns of ``order``) cut at
    the byte budget in ``order``, keeping the first task whatever its size; leased; the
    transition rows with what an Assignment needs (and the task's ``extra`` columns, as
    ``, a, b``), in ``claimed_order``."""
    return f"""picked AS (
        SELECT id FROM (
            SELECT id, sum(size) OVER (ORDER BY {order}) - size AS before FROM heads
        ) ahead
        WHERE before < :max_bytes
    ), changed AS (
        UPDATE tasks t
        SET state = {RUNNING}, attempt = t.attempt + 1, worker_id = :worker_id,
            lease_holder = :holder, lease_epoch = :epoch, lease_start_time = now(),
            lease_expire_time = now() + make_interval(secs => :lease_seconds),
            update_time = now()
        -- An array, not a join: the primary key is then the one way to the rows whatever
        -- the statistics say (the plain claim's plan is made once: store/db.py).
        WHERE t.id = ANY (ARRAY(SELECT id FROM picked))
        RETURNING {changed(from_state=PENDING)}, {columns(ASSIGNMENT_COLUMNS, "t")},
            t.deadline {extra.replace(", ", ", t.")}
    ) {tail(f"{columns(ASSIGNMENT_COLUMNS)}, create_time{extra}", claimed_order, finishes=False)}"""


_LEASE_HEADS = _lease_heads(_ORDER, _CLAIMED_ORDER)

_CLAIM = Query(
    "claim_tasks",
    f"""
    WITH heads AS (
        -- Per queue, the head of the ready index in dispatch order; then the best of
        -- those heads. Written so that the index gives the order whatever the planner's
        -- (always stale, on a queue table) statistics say.
        SELECT head.id, head.priority, head.deadline, head.size
        FROM unnest(:queues::text[]) AS q(name)
        CROSS JOIN LATERAL (
            SELECT id, priority, deadline, octet_length(payload) AS size FROM tasks
            WHERE tenant = :tenant AND state = {PENDING} AND queue = q.name
              AND type = ANY(:types::text[])
              -- Tasks with a concurrency key are the keyed claim's (claim_keyed).
              AND concurrency_key IS NULL
              {_BEFORE_DEADLINE}
              -- A worker that named its keys gets only tasks it can open (NULL: any).
              AND (:keys::text[] IS NULL OR encryption_key IS NULL
                   OR encryption_key = ANY(:keys::text[]))
            ORDER BY {_ORDER}
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        ) AS head
        WHERE {FENCE}
        ORDER BY {_ORDER}
        LIMIT :limit
    ), {_LEASE_HEADS}
    """,
)


def _lease_args(
    keys: Iterable[str] | None,
    limit: int,
    max_bytes: int,
    worker_id: str,
    holder: bytes,
    lease_seconds: float,
    fence: Fence,
) -> dict[str, Any]:
    """The parameters every claim statement takes besides what it claims from."""
    return {
        "keys": None if keys is None else list(keys),
        "limit": limit,
        "max_bytes": max_bytes,
        "worker_id": worker_id,
        "holder": holder,
        "epoch": fence.epoch,
        "lease_seconds": lease_seconds,
        "fence": fence,
    }


async def claim(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    queues: Sequence[str],
    types: Sequence[str],
    keys: Iterable[str] | None,
    limit: int,
    max_bytes: int,
    worker_id: str,
    holder: bytes,
    lease_seconds: float,
    fence: Fence,
    aging: tuple[float, int] | None = None,
) -> list[asyncpg.Record]:
    """Leases up to ``limit`` ready tasks of these queues and types, encrypted with one of
    ``keys`` or not encrypted (``keys`` None: any), to ``worker_id`` (its process's
    ``holder``: ``sessions.WorkerSession.holder``), in
    dispatch order (per queue the head of the ready index: priority, then the earliest
    deadline, then age, since ids are time-ordered; then the best of those heads; with
    ``aging``, (seconds per step, most steps), by priority raised with the wait), cut at
    ``max_bytes`` of payload (the first task whatever its size). Fenced. Returns the
    transitions, each with what its Assignment needs (:data:`ASSIGNMENT_COLUMNS`), in
    dispatch order.
    """
    # With aging (the coordinator's aging_interval, aging_max), see _CLAIM_AGED.
    query, aged = (
        (_CLAIM, {})
        if aging is None
        else (_CLAIM_AGED, {"aging_interval": aging[0], "aging_max": aging[1]})
    )
    return await query.fetch(
        conn,
        **aged,
        tenant=tenant,
        queues=list(queues),
        types=list(types),
        **_lease_args(keys, limit, max_bytes, worker_id, holder, lease_seconds, fence),
    )


def last_key(keys: Iterable[str], after: str) -> str:
    """Where the next keyed claim of a pair starts: of the ``keys`` a claim served, the
    last in the order it visited them (after ``after``, wrapping around). Python compares
    str by code point, as COLLATE "C" compares UTF-8 bytes."""
    served = set(keys)
    wrapped = [k for k in served if k <= after]
    return max(wrapped) if wrapped else max(served, default=after)


MAX_AGING_LEVELS = 64
"""Priority levels per queue an aged claim looks at (the highest ones with ready tasks)."""


def _effective(alias: str) -> str:
    """The effective priority of the row ``alias`` under aging: its priority raised by one
    per aging interval waited since ready, at most :aging_max (so a low priority cannot
    starve, and cannot jump without bound)."""
    return (
        f"{alias}.priority + least(:aging_max, floor(greatest(0, extract(epoch FROM now() - "
        f"{alias}.run_at)) / :aging_interval))::int"
    )


_AGED_ORDER = f"{_effective('changed')} DESC, changed.deadline, changed.id"

# The columns a candidate of a claim by pairs carries into its ranking.
_CANDIDATE = (
    "k.id, k.priority, k.deadline, octet_length(k.payload) AS size, k.queue, k.type, "
    "k.concurrency_key"
)
# Where a candidate of a claim by pairs may come from (besides its pair and key).
_CANDIDATE_FILTER = f"""k.tenant = :tenant AND k.state = {PENDING}
              AND (k.deadline IS NULL OR k.deadline > now())
              AND (:keys::text[] IS NULL OR k.encryption_key IS NULL
                   OR k.encryption_key = ANY(:keys::text[]))"""


def _pair_candidates(*, aged: bool) -> str:
    """The ``candidates`` CTE of the limited claim: per (queue, type) pair the head of the
    ready index, as many as its cap allows, so a limited type never stands in front of
    the others of its queue. With aging (``aged``), as the aged claim: per priority level
    of the pair's queue (a loose scan of the ready index, at most MAX_AGING_LEVELS) the
    oldest of the pair, then the pair's best ``cap`` of those by effective priority
    (column ``effective``)."""
    if not aged:
        return f"""candidates AS (
        SELECT c.* FROM unnest(:pair_queues::text[], :pair_types::text[], :pair_caps::int[])
            AS p(queue, type, cap)
        CROSS JOIN LATERAL (
            SELECT {_CANDIDATE}
            FROM tasks k
            WHERE {_CANDIDATE_FILTER} AND k.queue = p.queue AND k.type = p.type
              AND k.concurrency_key IS NULL
            ORDER BY k.priority DESC, k.deadline, k.id
            LIMIT p.cap
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE {FENCE}
    )"""
    # The levels of the pair's whole queue (tasks_ready has no type; an empty level
    # costs a probe and takes nothing).
    return f"""levels AS (
        SELECT l.queue, l.type, l.cap, (
            SELECT max(k.priority) FROM tasks k
            WHERE k.tenant = :tenant AND k.state = {PENDING} AND k.queue = l.queue
        ) AS priority, 1 AS depth
        FROM unnest(:pair_queues::text[], :pair_types::text[], :pair_caps::int[])
            AS l(queue, type, cap)
        UNION ALL
        SELECT l.queue, l.type, l.cap, (
            SELECT max(k.priority) FROM tasks k
            WHERE k.tenant = :tenant AND k.state = {PENDING} AND k.queue = l.queue
              AND k.priority < l.priority
        ), l.depth + 1
        FROM levels l WHERE l.priority IS NOT NULL AND l.depth < {MAX_AGING_LEVELS}
    ), leveled AS (
        SELECT c.*, {_effective("c")} AS effective, l.cap
        FROM levels l
        CROSS JOIN LATERAL (
            SELECT {_CANDIDATE}, k.run_at
            FROM tasks k
            WHERE {_CANDIDATE_FILTER} AND k.queue = l.queue AND k.type = l.type
              AND k.priority = l.priority AND k.concurrency_key IS NULL
            ORDER BY k.deadline, k.id
            LIMIT l.cap
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE l.priority IS NOT NULL AND {FENCE}
    ), candidates AS (
        SELECT * FROM (
            SELECT *, row_number() OVER (
                PARTITION BY queue, type ORDER BY effective DESC, deadline, id) AS in_pair
            FROM leveled
        ) best
        WHERE in_pair <= cap
    )"""


def _caps(order: str, aged: bool, key_room: str = "") -> str:
    """The ``ranked`` and ``heads`` CTEs of a claim by pairs: the caps of whole queues, whole
    types and the total applied to ``candidates`` in ``order`` (and ``key_room``)."""
    return f"""ranked AS (
        -- Running counts for the limits of a whole queue, a whole type and the tenant:
        -- a row over any cap is left (the counts include rows another cap left, so a
        -- claim may take fewer than the tokens allow, never more).
        SELECT *,
            row_number() OVER (PARTITION BY queue ORDER BY {order}) AS in_queue,
            row_number() OVER (PARTITION BY type ORDER BY {order}) AS in_type,
            row_number() OVER (ORDER BY {order}) AS in_all
        FROM candidates
    ), heads AS (
        SELECT id, priority, deadline, size{", effective" if aged else ""}{
        ", in_key" if key_room else ""
    } FROM ranked r
        LEFT JOIN unnest(:cap_queues::text[], :queue_caps::int[]) AS qc(queue, cap)
            ON qc.queue = r.queue
        LEFT JOIN unnest(:cap_types::text[], :type_caps::int[]) AS tc(type, cap)
            ON tc.type = r.type
        WHERE (qc.cap IS NULL OR r.in_queue <= qc.cap)
          AND (tc.cap IS NULL OR r.in_type <= tc.cap) AND r.in_all <= :total {key_room}
        ORDER BY {order}
        LIMIT :limit
    )"""


def _claim_by_pairs(name: str, *, aged: bool = False) -> Query:
    """The claim per (queue, type) pair with caps (rate limits, ``claim_limited``) of the
    tasks without a concurrency key. ``aged``: by effective priority (aging, as
    :data:`_CLAIM_AGED`) instead of priority."""
    order = "effective DESC, deadline, id" if aged else _ORDER
    return Query(
        name,
        f"""
    WITH {"RECURSIVE " if aged else ""}{_pair_candidates(aged=aged)}, {_caps(order, aged)},
    {_lease_heads(order, _AGED_ORDER) if aged else _LEASE_HEADS}
    """,
    )


MAX_KEYS_PER_CLAIM = 1000
"""Concurrency keys per (queue, type) pair one keyed claim looks at, from where the last
claim of the pair stopped (``after``), in key order, wrapping around."""

# A keyed task of the claim's tenant that is ready (index tasks_ready_keyed).
_KEYED_READY = f"k.tenant = :tenant AND k.state = {PENDING} AND k.concurrency_key IS NOT NULL"


def _next_key(queue: str, type_: str, after: str) -> str:
    """The pair's first key (byte order: COLLATE "C", as Python compares str) after
    ``after``, else its first key (wrapping around); NULL: none."""
    key = 'k.concurrency_key COLLATE "C"'
    where = f"{_KEYED_READY} AND k.queue = {queue} AND k.type = {type_}"
    return f"""coalesce(
            (SELECT min({key}) FROM tasks k WHERE {where} AND {key} > {after}),
            (SELECT min({key}) FROM tasks k WHERE {where}))"""


def _room(pair: str, key: str) -> str:
    """A LATERAL subquery of the key ``key`` of the pair ``pair`` (a row with queue, type
    and cap): ``busy``, its running tasks (index tasks_running_keyed), and ``room``, what
    it may take: its free slots by its best task's limit (a task with another limit is
    held to its own later), at most the pair's cap."""
    return f"""(
            SELECT z.busy, least({pair}.cap, greatest(0, z.most - z.busy))::int AS room
            FROM (SELECT (
                SELECT count(*) FROM tasks r WHERE r.tenant = :tenant AND r.state = {RUNNING}
                  AND r.concurrency_key = {key} COLLATE "default"
            ) AS busy, coalesce((
                SELECT k.concurrency_limit FROM tasks k WHERE {_KEYED_READY}
                  AND k.queue = {pair}.queue AND k.type = {pair}.type
                  AND k.concurrency_key COLLATE "C" = {key}
                ORDER BY k.priority DESC, k.deadline, k.id LIMIT 1
            ), 0) AS most) z
        )"""


def _claim_keyed(name: str, *, aged: bool) -> Query:
    """The claim of the tasks with a concurrency key (``claim_limited(keyed=True)``), per
    (queue, type) pair under its cap, fair between keys: it visits the pair's keys one
    by one (a loose scan of tasks_ready_keyed, at most MAX_KEYS_PER_CLAIM, starting
    after the key the last claim of the pair stopped at), takes from each at most the
    slots its limit leaves (its running rows counted once), and orders what it took by
    turns: every key's best task, then every key's second, ... (priority, or effective
    priority with ``aged``, within a turn). So a key's deep backlog delays another
    key's tasks by one turn per task ahead of them in that key, not by the backlog; a
    task is taken only while fewer than its key's limit run, counting the running rows
    and those ahead of it in this claim."""
    order = "effective DESC, deadline, id" if aged else _ORDER
    turns = f"in_key, {order}"
    key = 'k.concurrency_key COLLATE "C"'
    if aged:
        # Per slot, its priority levels (loose scan), the oldest of each, and the slot's
        # best by effective priority.
        per_key = f"""levels AS (
        SELECT s.*, (
            SELECT max(k.priority) FROM tasks k WHERE {_KEYED_READY} AND k.queue = s.queue
              AND k.type = s.type AND {key} = s.key
        ) AS priority, 1 AS depth
        FROM slots s
        UNION ALL
        SELECT l.queue, l.type, l.key, l.pair_cap, l.cap, l.busy, (
            SELECT max(k.priority) FROM tasks k WHERE {_KEYED_READY} AND k.queue = l.queue
              AND k.type = l.type AND {key} = l.key AND k.priority < l.priority
        ), l.depth + 1
        FROM levels l WHERE l.priority IS NOT NULL AND l.depth < {MAX_AGING_LEVELS}
    ), leveled AS (
        SELECT c.*, {_effective("c")} AS effective, l.cap, l.pair_cap, l.busy
        FROM levels l
        CROSS JOIN LATERAL (
            SELECT {_CANDIDATE}, k.run_at, k.concurrency_limit
            FROM tasks k
            WHERE {_CANDIDATE_FILTER} AND k.concurrency_key IS NOT NULL
              AND k.queue = l.queue AND k.type = l.type AND {key} = l.key
              AND k.priority = l.priority
            ORDER BY k.deadline, k.id
            LIMIT l.cap
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE l.priority IS NOT NULL AND l.cap > 0 AND {FENCE}
    ), per_key AS (
        SELECT * FROM (
            SELECT *, row_number() OVER (
                PARTITION BY queue, type, concurrency_key ORDER BY {order}) AS in_slot
            FROM leveled
        ) best
        WHERE in_slot <= cap
    )"""
    else:
        per_key = f"""per_key AS (
        SELECT c.*, s.pair_cap, s.busy
        FROM slots s
        CROSS JOIN LATERAL (
            SELECT {_CANDIDATE}, k.concurrency_limit
            FROM tasks k
            WHERE {_CANDIDATE_FILTER} AND k.concurrency_key IS NOT NULL
              AND k.queue = s.queue AND k.type = s.type AND {key} = s.key
            ORDER BY k.priority DESC, k.deadline, k.id
            LIMIT s.cap
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE s.cap > 0 AND {FENCE}
    )"""
    return Query(
        name,
        f"""
    WITH RECURSIVE keys AS (
        -- Per pair, its keys with ready tasks, from after where the last claim stopped,
        -- wrapping around, each once; with each key's free slots (room), until as many
        -- keys have room as the claim takes tasks (one each is a full claim already).
        SELECT p.queue, p.type, p.cap, f.key, f.key AS first, 1 AS n, o.busy, o.room,
            (o.room > 0)::int AS open
        FROM unnest(:pair_queues::text[], :pair_types::text[], :pair_caps::int[],
                    :pair_after::text[]) AS p(queue, type, cap, after)
        CROSS JOIN LATERAL (SELECT {_next_key("p.queue", "p.type", "p.after")} AS key) f
        CROSS JOIN LATERAL {_room("p", "f.key")} o
        WHERE f.key IS NOT NULL
        UNION ALL
        SELECT s.queue, s.type, s.cap, x.key, s.first, s.n + 1, o.busy, o.room,
            s.open + (o.room > 0)::int
        FROM keys s
        CROSS JOIN LATERAL (SELECT {_next_key("s.queue", "s.type", "s.key")} AS key) x
        CROSS JOIN LATERAL {_room("s", "x.key")} o
        WHERE s.n < {MAX_KEYS_PER_CLAIM} AND s.open < :limit AND x.key <> s.first
    ), slots AS (
        -- Each key takes at most its share of the claim: with K keys open, a claim of N
        -- takes N/K of each (rounded up), so it locks about N rows, not N per key. A key
        -- with fewer leaves the claim short; the next round follows at once.
        SELECT queue, type, key, cap AS pair_cap,
            least(room, ceil(:limit::float8 / count(*) OVER ()))::int AS cap, busy
        FROM keys WHERE room > 0
    ), {per_key}, turned AS (
        -- The turns: a task's place in its key (a key spans pairs: its slots are its).
        SELECT *, row_number() OVER (PARTITION BY concurrency_key ORDER BY {order}) AS in_key
        FROM per_key
    ), candidates AS (
        SELECT * FROM (
            SELECT *, row_number() OVER (PARTITION BY queue, type ORDER BY {turns}) AS in_pair
            FROM turned
        ) paired
        WHERE in_pair <= pair_cap
    ), {_caps(turns, aged, "AND r.in_key + r.busy <= r.concurrency_limit")},
    {_lease_heads(turns, _AGED_ORDER if aged else _CLAIMED_ORDER, ", concurrency_key")}
    """,
    )


_CLAIM_LIMITED = _claim_by_pairs("claim_tasks_limited")
_CLAIM_KEYED = _claim_keyed("claim_tasks_keyed", aged=False)
_CLAIM_LIMITED_AGED = _claim_by_pairs("claim_tasks_limited_aged", aged=True)
_CLAIM_KEYED_AGED = _claim_keyed("claim_tasks_keyed_aged", aged=True)


async def claim_limited(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    pairs: Sequence[tuple[str, str, int]],
    queue_caps: Sequence[tuple[str, int]] = (),
    type_caps: Sequence[tuple[str, int]] = (),
    total: int,
    keyed: bool = False,
    keys: Iterable[str] | None,
    limit: int,
    max_bytes: int,
    worker_id: str,
    holder: bytes,
    lease_seconds: float,
    fence: Fence,
    aging: tuple[float, int] | None = None,
    after: Sequence[str] = (),
) -> list[asyncpg.Record]:
    """:func:`claim` per (queue, type) pair: at most ``cap`` tasks of each (queue, type,
    cap) of ``pairs``, of each (queue, cap) of ``queue_caps`` and (type, cap) of
    ``type_caps``, and ``total`` in all (rate limits: ``dispatch/rate_limits.Caps``).
    Of the tasks without a concurrency key, or with ``keyed`` of those with one, each
    only while fewer than its key's ``concurrency_limit`` run (counted from the rows, so
    the limit holds across workers and failover), taking turns between keys (see
    :func:`_claim_keyed`): ``after`` holds, per pair, the key its last claim stopped at
    ("": none; keyed rows carry their ``concurrency_key``, for :func:`last_key`). Same
    order, with ``aging`` the same effective priority, as :func:`claim`; same rows."""
    extra: dict[str, Any] = {}
    if aging is None:
        query = _CLAIM_KEYED if keyed else _CLAIM_LIMITED
    else:
        query = _CLAIM_KEYED_AGED if keyed else _CLAIM_LIMITED_AGED
        extra.update(aging_interval=aging[0], aging_max=aging[1])
    if keyed:
        extra["pair_after"] = list(after) if after else [""] * len(pairs)
    return await query.fetch(
        conn,
        **extra,
        tenant=tenant,
        pair_queues=[p[0] for p in pairs],
        pair_types=[p[1] for p in pairs],
        pair_caps=[p[2] for p in pairs],
        cap_queues=[q for q, _ in queue_caps],
        queue_caps=[c for _, c in queue_caps],
        cap_types=[t for t, _ in type_caps],
        type_caps=[c for _, c in type_caps],
        total=total,
        **_lease_args(keys, limit, max_bytes, worker_id, holder, lease_seconds, fence),
    )


_CLAIM_AGED = Query(
    "claim_tasks_aged",
    f"""
    WITH RECURSIVE levels AS (
        -- Per queue, each priority level with ready tasks, highest first (a loose scan of
        -- the ready index: one probe per level).
        SELECT q.name AS queue, (
            SELECT max(priority) FROM tasks
            WHERE tenant = :tenant AND state = {PENDING} AND queue = q.name
        ) AS priority, 1 AS depth
        FROM unnest(:queues::text[]) AS q(name)
        UNION ALL
        SELECT l.queue, (
            SELECT max(priority) FROM tasks
            WHERE tenant = :tenant AND state = {PENDING} AND queue = l.queue
              AND priority < l.priority
        ), l.depth + 1
        FROM levels l WHERE l.priority IS NOT NULL AND l.depth < {MAX_AGING_LEVELS}
    ), heads AS (
        -- Per level the head of the ready index; then the best by effective priority:
        -- the priority raised by one per aging interval waited since ready, at most
        -- :aging_max (so a low priority cannot starve, and cannot jump without bound).
        SELECT c.id, c.priority, c.deadline, c.size, {_effective("c")} AS effective
        FROM levels l
        CROSS JOIN LATERAL (
            SELECT id, priority, deadline, run_at, octet_length(payload) AS size FROM tasks
            WHERE tenant = :tenant AND state = {PENDING} AND queue = l.queue
              AND priority = l.priority AND type = ANY(:types::text[])
              AND concurrency_key IS NULL {_BEFORE_DEADLINE}
              AND (:keys::text[] IS NULL OR encryption_key IS NULL
                   OR encryption_key = ANY(:keys::text[]))
            ORDER BY deadline, id
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE l.priority IS NOT NULL AND {FENCE}
        ORDER BY effective DESC, c.deadline, c.id
        LIMIT :limit
    ), {_lease_heads("effective DESC, deadline, id", _AGED_ORDER)}
    """,
)


_KEYED_TENANTS = Query(
    "tenants_with_keyed_tasks",
    f"""
    WITH RECURSIVE t(tenant) AS (
        -- Each tenant once, by skipping through the index (a DISTINCT reads every row).
        (SELECT tenant FROM tasks WHERE state = {PENDING} AND concurrency_key IS NOT NULL
         ORDER BY tenant LIMIT 1)
        UNION ALL
        SELECT (SELECT tenant FROM tasks WHERE state = {PENDING}
                AND concurrency_key IS NOT NULL AND tenant > t.tenant
                ORDER BY tenant LIMIT 1)
        FROM t WHERE t.tenant IS NOT NULL
    )
    SELECT tenant FROM t WHERE tenant IS NOT NULL
    """,
)


async def keyed_tenants(conn: asyncpg.Connection) -> set[str]:
    """The tenants with ready tasks that carry a concurrency key."""
    return {r[0] for r in await _KEYED_TENANTS.fetch(conn)}


# -- leases: renewals and results ------------------------------------------------------------

_RENEW = Query(
    "renew_leases",
    f"""
    UPDATE tasks t SET lease_expire_time = now() + make_interval(secs => :lease_seconds)
    FROM {_NUMBERED_KEYS}
    WHERE {FENCE} AND {_LEASE_MATCH}
    RETURNING r.i
    """,
)


async def renew_leases(
    conn: asyncpg.Connection, keys: Sequence[LeaseKey], lease_seconds: float, fence: Fence
) -> set[int]:
    """Extends the leases still held; returns the positions (in ``keys``) of those renewed.

    Positions, not keys: a set of small ints is the cheapest thing to build per row and
    to test each key against."""
    rows = await _RENEW.fetch(conn, lease_seconds=lease_seconds, fence=fence, **key_arrays(keys))
    return {row[0] for row in rows}


_OUTCOME_ARRAYS = (
    *KEY_ARRAYS,
    ("outcome", "smallint"),
    ("result", "bytea"),
    ("error", "text"),
    ("retryable", "bool"),
)


_HOLDS = Query(
    "holds_leases",
    f"""
    SELECT EXISTS (
        SELECT FROM tasks
        WHERE tenant = :tenant AND worker_id = :worker AND state = {RUNNING}
          AND lease_holder = :holder
    )
    """,
)


async def holds_leases(
    conn: asyncpg.Connection, tenant: str, worker_id: str, holder: bytes
) -> bool:
    """Whether the tenant's ``worker_id`` holds a lease granted to ``holder``."""
    return bool(await _HOLDS.fetchval(conn, tenant=tenant, worker=worker_id, holder=holder))


_RESUME = Query(
    "resume_leases",
    f"""
    UPDATE tasks t SET lease_expire_time = now() + make_interval(secs => :lease_seconds),
        lease_holder = :holder
    FROM {_NUMBERED_KEYS}
    WHERE {FENCE} AND {_LEASE_MATCH}
      -- NULL: granted before leases had holders (the migration), to whoever lists it.
      AND (t.lease_holder = :holder OR t.lease_holder IS NULL)
    RETURNING r.i
    """,
)


async def resume_leases(
    conn: asyncpg.Connection,
    keys: Sequence[LeaseKey],
    holder: bytes,
    lease_seconds: float,
    fence: Fence,
) -> set[int]:
    """Renews the leases a reconnecting worker lists that were granted to ``holder``;
    returns the positions (in ``keys``) of those renewed."""
    rows = await _RESUME.fetch(
        conn, holder=holder, lease_seconds=lease_seconds, fence=fence, **key_arrays(keys)
    )
    return {row[0] for row in rows}


class Outcome(NamedTuple):
    """The end of one attempt as a worker reported it."""

    key: LeaseKey
    outcome: int
    """An AttemptOutcome number."""
    result: bytes | None
    error: str
    retryable: bool


# A result that gives the attempt back: the worker's drain interrupted it, or it never
# started (the worker lacks the payload's encryption key). Ready again at once, not counted.
_GIVEN_BACK = f"r.outcome IN ({OUTCOME_INTERRUPTED}, {OUTCOME_NOT_STARTED})"


def _finish(name: str, *, dependents: bool) -> Query:
    """The result statement; without ``dependents``, for tasks without edges only."""
    # A task with an edge is left to the full statement (in this one's snapshot, as the
    # release fragment itself would see the edges). The edges of all the results' tasks
    # are read once, as an array (ids and after_id are never NULL): a look-up per task,
    # `NOT EXISTS (... WHERE e.after_id = t.id)`, was planned as a bitmap scan per row,
    # 1-3 us of each result's CPU (docs/performance.md, issue 19, fifth round).
    only = (
        ""
        if dependents
        else "AND t.id <> ALL (ARRAY(SELECT e.after_id FROM task_edges e"
        " WHERE e.after_id = ANY (:id::uuid[])))"
    )
    # The results' rows by the primary key, never by tasks_leased: ``t.state = RUNNING``
    # matches that partial index's predicate, and with statistics taken while few tasks
    # ran (they always are, on a queue table) the planner read every RUNNING task per
    # flush and joined them to the results. The test is a function call, not an
    # operator, so no index predicate matches it, and the planner gives it a function's
    # selectivity (a third) rather than an expression equality's (0.5 %): with that, it
    # expected 2 of a flush's 500 tasks, and joined the 500 results to them in a nested
    # loop over the scan materialized, 500 x 500 comparisons per flush: 20-90 ms each,
    # most of a result's PostgreSQL CPU with 10,000,000 tasks waiting (and at any depth
    # once statistics said so). Now a merge or hash join (docs/performance.md, issue 19,
    # sixth round: a deep backlog).
    match = _LEASE_MATCH.replace(f"t.state = {RUNNING}", f"int2eq(t.state, {RUNNING}::smallint)")
    return Query(
        name,
        f"""
    WITH r AS (
        SELECT * FROM {unnest(_OUTCOME_ARRAYS, "r", numbered=True)}
    ), changed AS (
        UPDATE tasks t SET
            state = CASE
                WHEN r.outcome = {OUTCOME_SUCCEEDED} THEN {SUCCEEDED}
                WHEN {_GIVEN_BACK} THEN {PENDING}
                WHEN r.retryable AND {_RETRY_LEFT} THEN {SCHEDULED}
                ELSE {DEAD} END,
            run_at = CASE
                WHEN {_GIVEN_BACK} THEN now()
                WHEN r.outcome <> {OUTCOME_SUCCEEDED} AND r.retryable AND {_RETRY_LEFT}
                THEN now() + {_BACKOFF} ELSE t.run_at END,
            attempt_base = t.attempt_base
                + CASE WHEN {_GIVEN_BACK} THEN 1 ELSE 0 END,
            finish_time = CASE
                WHEN r.outcome = {OUTCOME_SUCCEEDED} THEN now()
                WHEN {_GIVEN_BACK} THEN NULL
                WHEN NOT (r.retryable AND {_RETRY_LEFT}) THEN now() END,
            result = r.result,
            last_error = CASE WHEN r.outcome = {OUTCOME_SUCCEEDED} THEN t.last_error
                ELSE r.error END,
            worker_id = NULL, lease_expire_time = NULL, update_time = now()
        FROM r
        WHERE {FENCE} AND {match} AND t.id = ANY (:id::uuid[]) {only}
        RETURNING {changed(from_state=RUNNING, worker_id="r.worker_id", outcome="r.outcome")},
            r.error, r.i
    ), closed AS (
        INSERT INTO task_attempts ({columns(ATTEMPT_COLUMNS)})
        SELECT id, attempt, tenant, worker_id, lease_epoch, lease_start_time, now(), outcome,
            error
        FROM changed
    ) {tail("i", dependents=dependents)}
    """,
    )


_FINISH = _finish("finish_attempts", dependents=True)
_FINISH_PLAIN = _finish("finish_attempts_plain", dependents=False)


async def finish_attempts(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], fence: Fence
) -> list[asyncpg.Record]:
    """Applies results whose lease is current; returns their transitions.

    Success -> SUCCEEDED. Interrupted or not started -> PENDING at once, not counted.
    Failure -> SCHEDULED after a backoff when retryable with attempts left, else DEAD.
    The attempt row is closed in the same statement.
    """
    return await _FINISH.fetch(conn, fence=fence, **_outcome_arrays(outcomes))


async def finish_attempts_plain(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], fence: Fence
) -> list[asyncpg.Record]:
    """:func:`finish_attempts` for the tasks no edge names as a dependency (in this
    statement's snapshot), without the release of dependents: that release is two thirds
    of the statement's planning, which is done per batch, and writes nothing for such
    tasks. A result it does not apply (a task with dependents, or a stale lease) is for
    :func:`finish_attempts`.

    Equivalent to :func:`finish_attempts` for what it applies: that statement's release
    reads the edges in its own snapshot too, so an edge a submit commits meanwhile is seen
    by neither (the DependencySweeper's race, ``store/dependencies.py``)."""
    return await _FINISH_PLAIN.fetch(conn, fence=fence, **_outcome_arrays(outcomes))


async def warm_results(conn: asyncpg.Connection) -> None:
    """Plans the result statements once on ``conn`` without running them (``EXPLAIN``,
    no rows): asyncpg learns their types and the backend loads the catalog entries their
    planning reads, the costs of a first run on a connection (``db.RESULT_CONNECTIONS``)."""
    for query in (_FINISH_PLAIN, _FINISH):
        values = {"fence": Fence("", 0), **_outcome_arrays(())}
        await conn.fetch("EXPLAIN " + query.text, *query.args(values))


_RECORD_REFUSED = Query(
    "record_refused_results",
    f"""
    INSERT INTO refused_results (tenant, task_id, attempt, epoch, worker_id, outcome, reason)
    SELECT r.tenant, r.id, r.attempt, r.epoch, r.worker_id, r.outcome, :reason
    FROM {unnest(_OUTCOME_ARRAYS, "r")}
    """,
)


async def record_refused(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], reason: str
) -> None:
    """Records results that were refused (they change no task)."""
    await _RECORD_REFUSED.execute(conn, reason=reason, **_outcome_arrays(outcomes))


def _outcome_arrays(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Outcomes as the array parameters named in ``_OUTCOME_ARRAYS``."""
    arrays = transpose(
        [(o.outcome, o.result, o.error, o.retryable) for o in outcomes],
        [name for name, _ in _OUTCOME_ARRAYS[len(KEY_ARRAYS) :]],
    )
    return {**arrays, **key_arrays([o.key for o in outcomes])}


# -- leases: taking them back --------------------------------------------------------------

# Ends the leases of the rows in ``victims`` (id, worker_id): counted ones as the rules in
# the module docstring say (PENDING with attempts left, else DEAD), uncounted ones PENDING
# with attempt_base moved on. Every statement below is one of three ways to pick victims,
# followed by this.
_RELEASE = f"""
    changed AS (
        UPDATE tasks t SET
            state = CASE WHEN NOT :counted OR {_RETRY_LEFT} THEN {PENDING} ELSE {DEAD} END,
            attempt_base = t.attempt_base + CASE WHEN :counted THEN 0 ELSE 1 END,
            finish_time = CASE WHEN NOT :counted OR {_RETRY_LEFT} THEN NULL ELSE now() END,
            last_error = CASE WHEN :counted THEN format(:error::text, victims.worker_id)
                ELSE t.last_error END,
            worker_id = NULL, lease_expire_time = NULL, update_time = now()
        FROM victims WHERE t.id = victims.id
        RETURNING {changed(from_state=RUNNING, worker_id="victims.worker_id", outcome=":outcome")}
    ), closed AS (
        INSERT INTO task_attempts ({columns(ATTEMPT_COLUMNS)})
        SELECT id, attempt, tenant, worker_id, lease_epoch, lease_start_time, now(),
            outcome, format(:error::text, worker_id)
        FROM changed
    ) {TAIL}
"""


class Release(NamedTuple):
    """How released leases end: the attempt's outcome, whether it counts, and why."""

    outcome: int
    counted: bool
    error: str
    """A format() string; %s is the worker id."""


EXPIRED = Release(OUTCOME_LEASE_EXPIRED, True, "lease expired: worker %s stopped heartbeating")
RECONNECTED_WITHOUT = Release(
    OUTCOME_NOT_STARTED, False, "never started: worker %s reconnected without it"
)
TAKEN_OVER = Release(
    OUTCOME_LEASE_EXPIRED,
    True,
    "worker id %s connected from a process that does not hold this lease (no resume token "
    "of the one that did); it may have run",
)


def _nothing_due(name: str, due: str) -> Query:
    """A sweep's look before its statement: true when no row matches ``due`` (a
    condition on ``tasks`` that an index answers) and ``:epoch`` is still the cluster's.

    A sweep runs every second or so on the leader, and most find nothing; its statement
    carries the transition tail (the release of dependents, the webhook outbox) and was
    planned anew at every run: 3-25 ms of PostgreSQL's CPU a sweep (docs/performance.md,
    issue 19, fifth round), against a fraction of a millisecond for this. Nothing is
    written when it says so, so nothing needs the fence then; when the epoch is no
    longer the cluster's, the statement runs anyway and its fence refuses it, so a
    deposed leader learns it at its next sweep as before."""
    return Query(
        name,
        f"""
        SELECT NOT EXISTS (SELECT FROM tasks WHERE {due})
            AND EXISTS (SELECT FROM leadership WHERE cluster = :cluster AND epoch = :epoch)
        """,
    )


async def _idle(conn: asyncpg.Connection, query: Query, fence: Fence) -> bool:
    """Whether a sweep has nothing to do (see :func:`_nothing_due`)."""
    return bool(await query.fetchval(conn, cluster=fence.cluster, epoch=fence.epoch))


_NO_EXPIRED = _nothing_due("no_expired_leases", f"state = {RUNNING} AND lease_expire_time < now()")

_REAP = Query(
    "reap_expired_leases",
    f"""
    WITH victims AS (
        SELECT id, worker_id FROM tasks
        WHERE {FENCE} AND state = {RUNNING} AND lease_expire_time < now()
            AND (:only::uuid IS NULL OR id = :only)
        ORDER BY lease_expire_time LIMIT :limit FOR UPDATE SKIP LOCKED
    ), {_RELEASE}
    """,
)


async def reap_expired(
    conn: asyncpg.Connection, limit: int, fence: Fence, *, only: uuid.UUID | None = None
) -> list[asyncpg.Record]:
    """Takes back leases that expired (counted: the task may have run); of the task
    ``only`` alone, when given."""
    if only is None and await _idle(conn, _NO_EXPIRED, fence):
        return []
    return await _REAP.fetch(conn, limit=limit, fence=fence, only=only, **EXPIRED._asdict())


_EXPIRED_IDS = Query(
    "expired_lease_ids",
    f"""
    SELECT id FROM tasks WHERE state = {RUNNING} AND lease_expire_time < now()
    ORDER BY lease_expire_time LIMIT :limit
    """,
)


async def expired_lease_ids(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
    """The tasks whose lease expired, earliest first (the reaper's candidates)."""
    return [r["id"] for r in await _EXPIRED_IDS.fetch(conn, limit=limit)]


_UNREACHABLE = Query(
    "unreachable_scheduled",
    f"""
    SELECT id FROM tasks
    WHERE state = {SCHEDULED} AND run_at IN ('infinity', '-infinity')
    LIMIT :limit
    """,
)


async def unreachable_scheduled(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
    """SCHEDULED tasks whose run_at is infinite (written by hand: validation keeps run_at
    within a year): never due, and no time to compare with."""
    return [r["id"] for r in await _UNREACHABLE.fetch(conn, limit=limit)]


_SET_ASIDE = Query(
    "set_tasks_aside",
    f"""
    WITH changed AS (
        UPDATE tasks t SET state = {DEAD}, worker_id = NULL, lease_expire_time = NULL,
            finish_time = now(), update_time = now(), last_error = :why
        WHERE {FENCE} AND t.id = ANY(:ids::uuid[]) AND t.state = :state
        RETURNING {changed(from_state=":state")}
    ) {TAIL}
    """,
)


async def set_aside(
    conn: asyncpg.Connection, ids: Sequence[uuid.UUID], state: int, why: str, fence: Fence
) -> list[asyncpg.Record]:
    """Moves tasks a sweep cannot handle (still in ``state``) to DEAD, ``last_error``
    saying why: out of the sweep, in the dead-letter queue where an operator sees them.
    No attempt row: what could not be written is usually the attempt. Returns the
    transitions."""
    return await _SET_ASIDE.fetch(conn, ids=list(ids), state=state, why=why, fence=fence)


_RELEASE_ABANDONED = Query(
    "release_abandoned_leases",
    f"""
    WITH victims AS (
        SELECT id, worker_id FROM tasks t
        WHERE {FENCE} AND t.tenant = :tenant AND t.worker_id = :worker AND t.state = {RUNNING}
          AND t.lease_holder = :holder
          AND (t.id, t.attempt) NOT IN (SELECT * FROM unnest(:keep_ids::uuid[],
              :keep_attempts::int[]))
        FOR UPDATE
    ), {_RELEASE}
    """,
)


async def release_abandoned(
    conn: asyncpg.Connection,
    tenant: str,
    worker_id: str,
    holder: bytes,
    keep: Sequence[LeaseKey],
    fence: Fence,
) -> list[asyncpg.Record]:
    """Takes back the leases granted to ``holder`` that it does not list in Hello (not
    counted).

    Called when a worker (re)connects with its resume token: it lists every lease it
    holds, so any other was lost on the way (assigned to a stream that broke before it
    arrived).
    """
    return await _RELEASE_ABANDONED.fetch(
        conn,
        tenant=tenant,
        worker=worker_id,
        holder=holder,
        keep_ids=[k.task_id for k in keep],
        keep_attempts=[k.attempt for k in keep],
        fence=fence,
        **RECONNECTED_WITHOUT._asdict(),
    )


def _release_by_holder(name: str, holder_match: str) -> Query:
    """Ends the leases of a worker id whose holder matches (see the two uses)."""
    return Query(
        name,
        f"""
        WITH victims AS (
            SELECT id, worker_id FROM tasks
            WHERE {FENCE} AND tenant = :tenant AND worker_id = :worker AND state = {RUNNING}
              AND {holder_match}
            FOR UPDATE
        ), {_RELEASE}
        """,
    )


_RELEASE_FOREIGN = _release_by_holder(
    "release_foreign_leases", "lease_holder IS DISTINCT FROM :holder"
)


async def release_foreign(
    conn: asyncpg.Connection, tenant: str, worker_id: str, holder: bytes, fence: Fence
) -> list[asyncpg.Record]:
    """Takes back the leases of ``worker_id`` not granted to ``holder`` (counted).

    Called when a worker connects: leases of its worker id that another process holds
    (one that did not hand this Hello its resume token) may be running there, so they are
    never called not started; and they are not the new process's to finish.
    """
    return await _RELEASE_FOREIGN.fetch(
        conn, tenant=tenant, worker=worker_id, holder=holder, fence=fence, **TAKEN_OVER._asdict()
    )


_RELEASE_FOREIGN_MANY = Query(
    "release_foreign_leases_many",
    f"""
    WITH victims AS (
        SELECT t.id, t.worker_id FROM tasks t
        JOIN unnest(:tenants::text[], :workers::text[], :holders::bytea[]) AS a(tenant, worker,
            holder)
          ON t.tenant = a.tenant AND t.worker_id = a.worker
        WHERE {FENCE} AND t.state = {RUNNING} AND t.lease_holder IS DISTINCT FROM a.holder
        FOR UPDATE OF t
    ), {_RELEASE}
    """,
)


async def release_foreign_many(
    conn: asyncpg.Connection, arrivals: Sequence[tuple[str, str, bytes]], fence: Fence
) -> list[asyncpg.Record]:
    """:func:`release_foreign` for many ``(tenant, worker id, holder)`` at once, in one
    statement (a fleet's first Hellos); the rows name the tenant and worker id they were
    taken from."""
    tenants, workers, holders = (list(c) for c in zip(*arrivals, strict=True))
    return await _RELEASE_FOREIGN_MANY.fetch(
        conn,
        tenants=tenants,
        workers=workers,
        holders=holders,
        fence=fence,
        **TAKEN_OVER._asdict(),
    )


_RELEASE_KEYS = Query(
    "release_leases",
    f"""
    WITH victims AS (
        SELECT t.id, t.worker_id FROM tasks t JOIN {_KEYS} ON {_LEASE_MATCH}
        WHERE {FENCE}
        FOR UPDATE OF t
    ), {_RELEASE}
    """,
)


async def release_leases(
    conn: asyncpg.Connection, keys: Sequence[LeaseKey], how: Release, fence: Fence
) -> list[asyncpg.Record]:
    """Ends these leases if still current (those never delivered, or an evicted worker's)."""
    return await _RELEASE_KEYS.fetch(conn, fence=fence, **how._asdict(), **key_arrays(keys))


_RELEASE_WORKER = _release_by_holder("release_worker_leases", "lease_holder = :holder")


async def release_worker(
    conn: asyncpg.Connection,
    tenant: str,
    worker_id: str,
    holder: bytes,
    how: Release,
    fence: Fence,
) -> list[asyncpg.Record]:
    """Ends every lease of ``worker_id`` granted to ``holder`` (an evicted worker's)."""
    return await _RELEASE_WORKER.fetch(
        conn, tenant=tenant, worker=worker_id, holder=holder, fence=fence, **how._asdict()
    )


# -- maintenance ---------------------------------------------------------------------------

_PROMOTE = Query(
    "promote_due",
    f"""
    WITH changed AS (
        UPDATE tasks t SET state = {PENDING}, update_time = now()
        FROM (
            SELECT id FROM tasks
            WHERE {FENCE} AND state = {SCHEDULED} AND run_at <= now()
            ORDER BY run_at LIMIT :limit FOR UPDATE SKIP LOCKED
        ) due
        WHERE t.id = due.id
        RETURNING {changed(from_state=SCHEDULED)}
    ) {TAIL_NOT_FINISHING}
    """,
)


_NONE_DUE = _nothing_due("none_due", f"state = {SCHEDULED} AND run_at <= now()")


async def promote_due(conn: asyncpg.Connection, limit: int, fence: Fence) -> list[asyncpg.Record]:
    """Makes SCHEDULED tasks whose run_at has come PENDING; returns their transitions."""
    if await _idle(conn, _NONE_DUE, fence):
        return []
    return await _PROMOTE.fetch(conn, limit=limit, fence=fence)


_EXPIRE_DEADLINES = Query(
    "expire_deadlines",
    f"""
    WITH due AS (
        SELECT id, state FROM tasks
        WHERE {FENCE} AND deadline < now() AND deadline IS NOT NULL
          AND state IN ({PENDING}, {SCHEDULED})
        ORDER BY deadline LIMIT :limit FOR UPDATE SKIP LOCKED
    ), changed AS (
        UPDATE tasks t SET state = {DEAD}, finish_time = now(), update_time = now(),
            last_error = format('DEADLINE_EXCEEDED: its deadline (%s) passed before an '
                'attempt could start', t.deadline)
        FROM due WHERE t.id = due.id
        RETURNING {changed(from_state="due.state")}
    ) {TAIL}
    """,
)


_NO_DEADLINE_PASSED = _nothing_due(
    "no_deadline_passed",
    f"deadline < now() AND deadline IS NOT NULL AND state IN ({PENDING}, {SCHEDULED})",
)


async def expire_deadlines(
    conn: asyncpg.Connection, limit: int, fence: Fence
) -> list[asyncpg.Record]:
    """Makes the waiting tasks (PENDING, SCHEDULED) whose deadline passed DEAD, earliest
    first; returns their transitions."""
    if await _idle(conn, _NO_DEADLINE_PASSED, fence):
        return []
    return await _EXPIRE_DEADLINES.fetch(conn, limit=limit, fence=fence)


_NEXT_DEADLINE = Query(
    "next_deadline",
    f"""
    SELECT min(deadline) FROM tasks
    WHERE deadline IS NOT NULL AND state IN ({PENDING}, {SCHEDULED})
    """,
)


async def next_deadline(conn: asyncpg.Connection) -> datetime | None:
    """The earliest deadline of a waiting task (index tasks_deadline)."""
    value: datetime | None = await _NEXT_DEADLINE.fetchval(conn)
    return value


_NEXT_RUN_AT = Query("next_run_at", f"SELECT min(run_at) FROM tasks WHERE state = {SCHEDULED}")


async def next_run_at(conn: asyncpg.Connection) -> datetime | None:
    value: datetime | None = await _NEXT_RUN_AT.fetchval(conn)
    return value


# -- transitions -----------------------------------------------------------------------------

# A cancel ends the attempt of a RUNNING task; a waiting task has none to end.
_CANCELLED_OUTCOME = f"CASE WHEN old.state = {RUNNING} THEN {OUTCOME_CANCELLED} END"

_CANCEL = Query(
    "cancel_task",
    f"""
    WITH old AS (
        SELECT id, state, worker_id FROM tasks
        WHERE {FENCE} AND tenant = :tenant AND id = :id FOR UPDATE
    ), changed AS (
        UPDATE tasks t SET state = {CANCELLED}, finish_time = now(), update_time = now(),
            worker_id = NULL, lease_expire_time = NULL
        FROM old WHERE t.id = old.id
            AND old.state IN ({PENDING}, {SCHEDULED}, {RUNNING}, {BLOCKED})
        RETURNING {
        changed(from_state="old.state", worker_id="old.worker_id", outcome=_CANCELLED_OUTCOME)
    }
    ), closed AS (
        INSERT INTO task_attempts ({columns(ATTEMPT_COLUMNS)})
        SELECT id, attempt, tenant, worker_id, lease_epoch, lease_start_time, now(),
            {OUTCOME_CANCELLED}, 'cancelled'
        FROM changed
        WHERE from_state = {RUNNING}
    ) {TAIL}
    """,
)


async def cancel(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID, fence: Fence
) -> list[asyncpg.Record]:
    """Cancels a non-terminal task; returns its transition (none if it changed nothing),
    then those of the dependents its cancel released or cancelled."""
    return await _CANCEL.fetch(conn, tenant=tenant, id=task_id, fence=fence)


# -- operations: the dead-letter queue, bulk redrive, purge and retention --------------------

# The error fingerprint of a task: the first line of its last error ("Type: message", as
# the worker SDK writes it), cut to a length that groups well and fits a label.
FINGERPRINT_LENGTH = 200
_FINGERPRINT = f"left(split_part(t.last_error, chr(10), 1), {FINGERPRINT_LENGTH})"
# What a dead-letter filter matches (validation.DeadFilter), states aside: those go into
# the text as literals (see _states) so that DEAD alone reads the tasks_dead index.
_DEAD_MATCH = f"""
    t.tenant = :tenant
    AND (:queue::text IS NULL OR t.queue = :queue)
    AND (:type::text IS NULL OR t.type = :type)
    AND (:fingerprint::text IS NULL OR {_FINGERPRINT} = :fingerprint)
    AND (:after::timestamptz IS NULL OR t.finish_time >= :after)
    AND (:before::timestamptz IS NULL OR t.finish_time < :before)
"""


class DeadFilter(NamedTuple):
    """Which finished tasks of a tenant an operation takes (``validation.dead_filter``)."""

    tenant: str
    states: tuple[int, ...]
    """Terminal states, in ascending order."""
    queue: str | None = None
    type: str | None = None
    fingerprint: str | None = None
    after: datetime | None = None
    before: datetime | None = None

    def params(self) -> dict[str, Any]:
        values = self._asdict()
        del values["states"]
        return values


def _states(states: Sequence[int]) -> str:
    """``t.state IN (...)`` with literal states (never from a request as text: ints)."""
    return f"t.state IN ({', '.join(str(int(s)) for s in states)})"


_queries: dict[tuple[str, tuple[int, ...]], Query] = {}


def _for_states(name: str, states: tuple[int, ...], text: str) -> Query:
    """The statement ``text`` (``{states}`` marks the state test) for these states,
    compiled once per set of states (at most seven: subsets of the terminal ones)."""
    query = _queries.get((name, states))
    if query is None:
        query = _queries[(name, states)] = Query(name, text.replace("{states}", _states(states)))
    return query


_LIST_DEAD = f"""
    SELECT {_TASK} FROM tasks t
    WHERE {{states}} AND {_DEAD_MATCH}
      AND (:after_id::uuid IS NULL OR t.id < :after_id)
    ORDER BY t.id DESC
    LIMIT :limit
"""


async def list_dead(
    conn: asyncpg.Connection, flt: DeadFilter, after_id: uuid.UUID | None, limit: int
) -> list[asyncpg.Record]:
    """Finished tasks matching ``flt``, newest first, after the page token ``after_id``."""
    query = _for_states("list_dead_tasks", flt.states, _LIST_DEAD)
    return await query.fetch(conn, after_id=after_id, limit=limit, **flt.params())


_DEAD_GROUPS = f"""
    SELECT t.type, {_FINGERPRINT} AS fingerprint, count(*) AS n,
        min(t.finish_time) AS first_seen, max(t.finish_time) AS last_seen,
        array_agg(DISTINCT t.queue ORDER BY t.queue) AS queues
    FROM tasks t
    WHERE {{states}} AND {_DEAD_MATCH}
    GROUP BY 1, 2
    ORDER BY n DESC, t.type, fingerprint
    LIMIT :limit
"""


async def dead_groups(
    conn: asyncpg.Connection, flt: DeadFilter, limit: int
) -> list[asyncpg.Record]:
    """Tasks matching ``flt`` grouped by type and error fingerprint, largest first."""
    query = _for_states("dead_task_groups", flt.states, _DEAD_GROUPS)
    return await query.fetch(conn, limit=limit, **flt.params())


# A redrive: the task becomes PENDING now with a fresh attempt budget (the module
# docstring), from whichever state ``old`` found it in (DEAD or CANCELLED).
_REDRIVE_OLD = f"""
    changed AS (
        UPDATE tasks t SET state = {PENDING}, attempt_base = t.attempt, run_at = now(),
            finish_time = NULL, result = NULL, update_time = now(),
            -- A passed deadline would end it again at once: a redriven task has none.
            deadline = NULL
        FROM old WHERE t.id = old.id
        RETURNING {changed(from_state="old.state")}
    ) {TAIL_NOT_FINISHING}
"""
REDRIVABLE = (DEAD, CANCELLED)
"""The states a redrive takes a task from."""

_REDRIVE_IDS = Query(
    "redrive_tasks",
    f"""
    WITH old AS (
        SELECT id, state FROM tasks t
        WHERE {FENCE} AND t.tenant = :tenant AND t.id = ANY(:ids::uuid[])
          AND {_states(REDRIVABLE)}
        ORDER BY t.id
        FOR UPDATE
    ), {_REDRIVE_OLD}
    """,
)


async def redrive_ids(
    conn: asyncpg.Connection, tenant: str, ids: Sequence[uuid.UUID], fence: Fence
) -> list[asyncpg.Record]:
    """Makes the tenant's tasks among ``ids`` that are DEAD or CANCELLED PENDING with a
    fresh attempt budget; returns their transitions (the others are left alone)."""
    return await _REDRIVE_IDS.fetch(conn, tenant=tenant, ids=list(ids), fence=fence)


async def redrive(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID, fence: Fence
) -> list[asyncpg.Record]:
    """Makes a DEAD or CANCELLED task PENDING with a fresh attempt budget; returns its
    transition (none if it is in neither state)."""
    return await redrive_ids(conn, tenant, [task_id], fence)


_REDRIVE_MATCHING = f"""
    WITH old AS (
        SELECT id, state FROM tasks t
        WHERE {FENCE} AND {{states}} AND {_DEAD_MATCH}
        ORDER BY t.id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), {_REDRIVE_OLD}
"""


async def redrive_matching(
    conn: asyncpg.Connection, flt: DeadFilter, limit: int, fence: Fence
) -> list[asyncpg.Record]:
    """Redrives up to ``limit`` tasks matching ``flt`` (whose states are among
    :data:`REDRIVABLE`), oldest first; returns their transitions."""
    query = _for_states("redrive_matching_tasks", flt.states, _REDRIVE_MATCHING)
    return await query.fetch(conn, limit=limit, fence=fence, **flt.params())


_EXISTING = Query(
    "existing_tasks",
    "SELECT id::text FROM tasks WHERE tenant = :tenant AND id = ANY(:ids::uuid[])",
)


async def existing(conn: asyncpg.Connection, tenant: str, ids: Sequence[uuid.UUID]) -> set[str]:
    """The ids (canonical text) of ``ids`` that name a task of ``tenant``."""
    return {r[0] for r in await _EXISTING.fetch(conn, tenant=tenant, ids=list(ids))}


# Deleting a finished task is no state change (nothing watches a finished task): its row
# and its attempts (the tasks_delete_attempts trigger, migration 0013) go. Unfinished
# tasks are never deleted.
_DELETE_IDS = Query(
    "delete_tasks",
    f"""
    DELETE FROM tasks t
    WHERE t.tenant = :tenant AND t.id = ANY(:ids::uuid[]) AND {_states(sorted(TERMINAL))}
    RETURNING t.id::text
    """,
)


async def delete_ids(conn: asyncpg.Connection, tenant: str, ids: Sequence[uuid.UUID]) -> set[str]:
    """Deletes the tenant's finished tasks among ``ids``; returns the ids deleted."""
    return {r[0] for r in await _DELETE_IDS.fetch(conn, tenant=tenant, ids=list(ids))}


_DELETE_MATCHING = f"""
    DELETE FROM tasks WHERE id IN (
        SELECT id FROM tasks t
        WHERE {{states}} AND {_DEAD_MATCH}
        ORDER BY t.id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
"""


async def delete_matching(conn: asyncpg.Connection, flt: DeadFilter, limit: int) -> int:
    """Deletes up to ``limit`` tasks matching ``flt`` (finished states only), oldest
    first; returns how many."""
    query = _for_states("delete_matching_tasks", flt.states, _DELETE_MATCHING)
    status = await query.execute(conn, limit=limit, **flt.params())
    return int(status.split()[-1])


_PURGE_EXPIRED = Query(
    "purge_expired_tasks",
    f"""
    DELETE FROM tasks WHERE id IN (
        -- Finished before the cutoff means created before it: ids are UUIDv7, so the
        -- primary key's range below the cutoff's id holds them all (no index of finish
        -- times, which every finishing task would pay for).
        SELECT id FROM tasks t
        WHERE t.id < :below AND {_states(sorted(TERMINAL))} AND t.finish_time < :cutoff
        ORDER BY t.id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    RETURNING tenant
    """,
)


async def purge_expired(conn: asyncpg.Connection, cutoff: datetime, limit: int) -> list[str]:
    """Deletes up to ``limit`` tasks (of every tenant) that finished before ``cutoff``,
    oldest first; returns the tenant of each task deleted."""
    below = uuid.UUID(int=int(cutoff.timestamp() * 1000) << 80)  # the least UUIDv7 of then
    rows = await _PURGE_EXPIRED.fetch(conn, below=below, cutoff=cutoff, limit=limit)
    return [r[0] for r in rows]


# One statement per state, so each reads its own partial index (as _QUEUE_DEPTHS does).
_UNFINISHED_PER_QUEUE = Query(
    "unfinished_per_queue",
    f"""
    SELECT tenant, queue, sum(n)::bigint AS n FROM (
        SELECT tenant, queue, count(*) AS n FROM tasks WHERE state = {PENDING}
        GROUP BY tenant, queue
        UNION ALL
        SELECT tenant, queue, count(*) FROM tasks WHERE state = {SCHEDULED}
        GROUP BY tenant, queue
        UNION ALL
        SELECT tenant, queue, count(*) FROM tasks WHERE state = {RUNNING}
        GROUP BY tenant, queue
    ) counts GROUP BY tenant, queue
    """,
)


async def unfinished_per_queue(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """Unfinished tasks (PENDING, SCHEDULED, RUNNING) per (tenant, queue) that has any."""
    rows = await _UNFINISHED_PER_QUEUE.fetch(conn)
    return {(r["tenant"], r["queue"]): int(r["n"]) for r in rows}


# -- versioned updates (UpdateTask) -----------------------------------------------------------

_FOR_UPDATE = Query(
    "task_for_update",
    """
    SELECT state, attempt, attempt_base, version FROM tasks
    WHERE tenant = :tenant AND id = :id
    FOR UPDATE
    """,
)


async def lock_for_update(
    conn: asyncpg.Connection, tenant: str, task_id: uuid.UUID
) -> asyncpg.Record | None:
    """Locks the tenant's task until the transaction ends; its state, attempts and
    version (None when there is no such task). Concurrent updates of one task queue here,
    and each sees the version the one before it wrote."""
    return await _FOR_UPDATE.fetchrow(conn, tenant=tenant, id=task_id)


def waiting_unstarted(row: asyncpg.Record) -> bool:
    """Whether UpdateTask may change the task: it waits (PENDING, SCHEDULED) and no
    attempt counted since its submit or its last RetryTask."""
    return row["state"] in (PENDING, SCHEDULED) and row["attempt"] == row["attempt_base"]


_UPDATE = Query(
    "update_task",
    f"""
    WITH old AS (
        SELECT id, state FROM tasks
        WHERE {FENCE} AND tenant = :tenant AND id = :id AND version = :version
          AND state IN ({PENDING}, {SCHEDULED}) AND attempt = attempt_base
    ), updated AS (
        UPDATE tasks t SET
            priority = coalesce(:priority::int, t.priority),
            max_attempts = coalesce(:max_attempts::int, t.max_attempts),
            labels = coalesce(:labels::jsonb, t.labels),
            run_at = coalesce(:run_at::timestamptz, t.run_at),
            state = CASE
                WHEN :run_at::timestamptz IS NULL THEN t.state
                WHEN :run_at::timestamptz > now() THEN {SCHEDULED}
                ELSE {PENDING}
            END,
            version = t.version + 1, update_time = now()
        FROM old WHERE t.id = old.id
        RETURNING t.*, old.state AS old_state
    ), changed AS (
        SELECT {changed("updated", from_state="updated.old_state")} FROM updated
        WHERE updated.state <> updated.old_state
    ) {TAIL_NOT_FINISHING}
    """,
)


async def update_waiting(
    conn: asyncpg.Connection,
    tenant: str,
    task_id: uuid.UUID,
    *,
    version: int,
    priority: int | None,
    max_attempts: int | None,
    labels: str | None,
    run_at: datetime | None,
    fence: Fence,
) -> asyncpg.Record | None:
    """Changes the fields given (None: kept) of a waiting, unstarted task still at
    ``version``, and bumps the version; a ``run_at`` in the future makes it SCHEDULED, one
    now or past PENDING. Call :func:`lock_for_update` first in the same transaction (it
    tells why a task cannot be updated). Fenced (the state it sets is dispatch state).
    Returns the transition when the state changed, else None.
    """
    return await _UPDATE.fetchrow(
        conn,
        tenant=tenant,
        id=task_id,
        version=version,
        priority=priority,
        max_attempts=max_attempts,
        labels=labels,
        run_at=run_at,
        fence=fence,
    )
