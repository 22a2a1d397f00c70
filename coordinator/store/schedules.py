"""SQL for the ``schedules`` table.

Plain, parameterised statements. Every statement filters by tenant, except the firer's
(``due``, ``templates``, ``advance``, ``next_wake``), which act for all tenants by design,
like the maintenance sweeps.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from conveyor.coordinator.schedules.cron import OVERLAP_ALLOW
from conveyor.coordinator.store.sql import Query, columns, transpose, unnest
from conveyor.coordinator.store.tasks import (
    CANCELLED,
    DEAD,
    NEW_TASK_ARRAYS,
    NEW_TASK_COLUMNS,
    PENDING,
    SUCCEEDED,
    UNSPECIFIED,
    NewRow,
    new_row_values,
)
from conveyor.coordinator.store.transitions import TAIL_NOT_FINISHING, changed

if TYPE_CHECKING:
    from conveyor.coordinator.api.validation import NewTask

SCHEDULE_COLUMNS = (
    "id", "tenant", "name", "cron", "time_zone", "template", "overlap_policy",
    "catch_up_policy", "catch_up_limit", "paused", "start_time", "end_time",
    "next_fire_time", "buffered_tick", "last_task_id", "version", "create_time", "update_time",
    "fault",
)  # fmt: skip
"""Every column a Schedule message shows."""
_SCHEDULE = columns(SCHEDULE_COLUMNS, "s")


@dataclass(frozen=True)
class ScheduleRow:
    """The columns a client sets (directly or through validation) when writing a schedule."""

    tenant: str
    name: str
    cron: str
    time_zone: str
    template: bytes
    overlap_policy: int
    catch_up_policy: int
    catch_up_limit: int
    start_time: datetime | None
    end_time: datetime | None


_INSERT = Query(
    "insert_schedule",
    f"""
    INSERT INTO schedules AS s (id, tenant, name, cron, time_zone, template,
        overlap_policy, catch_up_policy, catch_up_limit, paused, start_time, end_time,
        next_fire_time, wake_time, create_time, update_time)
    VALUES (:id, :tenant, :name, :cron, :time_zone, :template, :overlap_policy,
        :catch_up_policy, :catch_up_limit, :paused, :start_time, :end_time, :next_fire_time,
        :next_fire_time, :now, :now)
    ON CONFLICT (tenant, name) DO NOTHING
    RETURNING {_SCHEDULE}
    """,
)


def _row_values(row: ScheduleRow) -> dict[str, object]:
    return {
        "tenant": row.tenant,
        "cron": row.cron,
        "time_zone": row.time_zone,
        "template": row.template,
        "overlap_policy": row.overlap_policy,
        "catch_up_policy": row.catch_up_policy,
        "catch_up_limit": row.catch_up_limit,
        "start_time": row.start_time,
        "end_time": row.end_time,
    }


async def insert(
    conn: asyncpg.Connection,
    schedule_id: uuid.UUID,
    row: ScheduleRow,
    *,
    paused: bool,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record | None:
    """Inserts a schedule; None when the tenant has one with that name already."""
    return await _INSERT.fetchrow(
        conn,
        id=schedule_id,
        name=row.name,
        paused=paused,
        next_fire_time=next_fire_time,
        now=now,
        **_row_values(row),
    )


_INSERT_MANY_ARRAYS = (
    ("id", "uuid"),
    ("tenant", "text"),
    ("name", "text"),
    ("cron", "text"),
    ("time_zone", "text"),
    ("template", "bytea"),
    ("overlap_policy", "smallint"),
    ("catch_up_policy", "smallint"),
    ("catch_up_limit", "integer"),
    ("paused", "boolean"),
    ("start_time", "timestamptz"),
    ("end_time", "timestamptz"),
    ("next_fire_time", "timestamptz"),
)
_INSERT_MANY = Query(
    "insert_schedules",
    f"""
    INSERT INTO schedules (id, tenant, name, cron, time_zone, template, overlap_policy,
        catch_up_policy, catch_up_limit, paused, start_time, end_time, next_fire_time,
        wake_time, create_time, update_time)
    SELECT r.id, r.tenant, r.name, r.cron, r.time_zone, r.template, r.overlap_policy,
        r.catch_up_policy, r.catch_up_limit, r.paused, r.start_time, r.end_time,
        r.next_fire_time, r.next_fire_time, :now, :now
    FROM {unnest(_INSERT_MANY_ARRAYS, "r")}
    ON CONFLICT (tenant, name) DO NOTHING
    """,
)


@dataclass(frozen=True)
class NewSchedule:
    """One schedule of :func:`insert_many`: a validated row and its first tick."""

    id: uuid.UUID
    row: ScheduleRow
    paused: bool
    next_fire_time: datetime | None


def _new_schedule_record(s: NewSchedule) -> tuple[object, ...]:
    row = s.row
    return (
        s.id, row.tenant, row.name, row.cron, row.time_zone, row.template, row.overlap_policy,
        row.catch_up_policy, row.catch_up_limit, s.paused, row.start_time, row.end_time,
        s.next_fire_time,
    )  # fmt: skip


async def insert_many(
    conn: asyncpg.Connection, schedules: Sequence[NewSchedule], now: datetime
) -> None:
    """Inserts many validated schedules in one statement (names already taken are left
    as they are). For bulk loads (``conveyor bench-schedules``); tenant quotas are the
    caller's to check."""
    await _INSERT_MANY.execute(
        conn,
        now=now,
        **transpose(
            [_new_schedule_record(s) for s in schedules],
            [name for name, _ in _INSERT_MANY_ARRAYS],
        ),
    )


_START_PAUSED = Query(
    "start_paused_schedules",
    """
    UPDATE schedules s SET paused = false, next_fire_time = :first, wake_time = :first,
        buffered_tick = NULL, version = s.version + 1, update_time = :now
    WHERE s.tenant = :tenant AND s.cron = :cron AND s.paused
    """,
)


async def start_paused(
    conn: asyncpg.Connection, tenant: str, cron: str, first: datetime, now: datetime
) -> int:
    """Resumes all the tenant's paused schedules of expression ``cron`` (UTC) at once,
    from ``first`` (one of its ticks), as ResumeSchedule would one by one; returns how
    many. For bulk set-ups (``conveyor bench-schedules``: all start at the same tick)."""
    status: str = await _START_PAUSED.execute(conn, tenant=tenant, cron=cron, first=first, now=now)
    return int(status.rsplit(maxsplit=1)[-1])


_GET = Query(
    "get_schedule",
    f"SELECT {_SCHEDULE} FROM schedules s WHERE s.tenant = :tenant AND s.name = :name",
)
_GET_FOR_UPDATE = Query(
    "get_schedule_for_update",
    f"SELECT {_SCHEDULE} FROM schedules s WHERE s.tenant = :tenant AND s.name = :name FOR UPDATE",
)


async def get(
    conn: asyncpg.Connection, tenant: str, name: str, *, for_update: bool = False
) -> asyncpg.Record | None:
    query = _GET_FOR_UPDATE if for_update else _GET
    return await query.fetchrow(conn, tenant=tenant, name=name)


_LIST_PAGE = Query(
    "list_schedules",
    f"""
    SELECT {_SCHEDULE} FROM schedules s
    WHERE s.tenant = :tenant AND (:after_name::text IS NULL OR s.name > :after_name)
    ORDER BY s.name
    LIMIT :limit
    """,
)


async def list_page(
    conn: asyncpg.Connection, tenant: str, after_name: str | None, page_size: int
) -> list[asyncpg.Record]:
    """By name; fetches one row more than the page to tell whether another page exists."""
    return await _LIST_PAGE.fetch(conn, tenant=tenant, after_name=after_name, limit=page_size + 1)


_UPDATE = Query(
    "update_schedule",
    f"""
    UPDATE schedules s SET cron = :cron, time_zone = :time_zone, template = :template,
        overlap_policy = :overlap_policy, catch_up_policy = :catch_up_policy,
        catch_up_limit = :catch_up_limit, start_time = :start_time, end_time = :end_time,
        next_fire_time = CASE WHEN :restart THEN :next_fire_time ELSE s.next_fire_time END,
        wake_time = CASE WHEN :restart THEN :next_fire_time ELSE s.wake_time END,
        buffered_tick = CASE WHEN :restart THEN NULL ELSE s.buffered_tick END,
        fault = NULL, version = s.version + 1, update_time = :now
    WHERE s.tenant = :tenant AND s.id = :id
    RETURNING {_SCHEDULE}
    """,
)


async def update(
    conn: asyncpg.Connection,
    schedule_id: uuid.UUID,
    row: ScheduleRow,
    *,
    restart: bool,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record:
    """Writes the client-set columns; ``restart`` also moves the cursor to next_fire_time
    (give a schedule set aside by the firer a restart: it is back in service)."""
    record: asyncpg.Record = await _UPDATE.fetchrow(
        conn,
        id=schedule_id,
        restart=restart,
        next_fire_time=next_fire_time,
        now=now,
        **_row_values(row),
    )
    return record


_DELETE = Query(
    "delete_schedule",
    "DELETE FROM schedules WHERE tenant = :tenant AND name = :name RETURNING id",
)


async def delete(conn: asyncpg.Connection, tenant: str, name: str) -> bool:
    return await _DELETE.fetchval(conn, tenant=tenant, name=name) is not None


_PAUSE = Query(
    "pause_schedule",
    f"""
    UPDATE schedules s SET
        paused = true, buffered_tick = NULL,
        version = s.version + CASE WHEN s.paused THEN 0 ELSE 1 END,
        update_time = CASE WHEN s.paused THEN s.update_time ELSE :now END
    WHERE s.tenant = :tenant AND s.name = :name
    RETURNING {_SCHEDULE}
    """,
)


async def pause(
    conn: asyncpg.Connection, tenant: str, name: str, now: datetime
) -> asyncpg.Record | None:
    """Pauses a schedule (a buffered tick is dropped); returns it, None if there is none."""
    return await _PAUSE.fetchrow(conn, tenant=tenant, name=name, now=now)


_RESUME = Query(
    "resume_schedule",
    f"""
    UPDATE schedules s SET paused = false, next_fire_time = :next_fire_time,
        wake_time = :next_fire_time, buffered_tick = NULL, fault = NULL,
        version = s.version + 1, update_time = :now
    WHERE s.tenant = :tenant AND s.id = :id
    RETURNING {_SCHEDULE}
    """,
)


async def resume(
    conn: asyncpg.Connection,
    tenant: str,
    schedule_id: uuid.UUID,
    next_fire_time: datetime | None,
    now: datetime,
) -> asyncpg.Record:
    """Unpauses a schedule (locked by the caller) with a fresh cursor; one the firer set
    aside is back in service."""
    record: asyncpg.Record = await _RESUME.fetchrow(
        conn, tenant=tenant, id=schedule_id, next_fire_time=next_fire_time, now=now
    )
    return record


_FIRINGS = Query(
    "schedule_firings",
    """
    SELECT idempotency_key, id, state, create_time FROM tasks
    WHERE tenant = :tenant AND idempotency_key = ANY(:keys::text[])
    UNION
    SELECT idempotency_key, id, state, create_time FROM tasks
    WHERE tenant = :tenant AND id = ANY(:ids::uuid[])
    """,
)


async def firings(
    conn: asyncpg.Connection, tenant: str, keys: Sequence[str], task_ids: Sequence[uuid.UUID]
) -> list[asyncpg.Record]:
    """The tasks with these idempotency keys or ids: (idempotency_key, id, state, create_time)."""
    if not keys and not task_ids:
        return []
    return await _FIRINGS.fetch(conn, tenant=tenant, keys=list(keys), ids=list(task_ids))


_REFUSALS = Query(
    "schedule_refusals",
    """
    SELECT schedule_id, tick, limit_name, refuse_time FROM (
        SELECT r.*, row_number() OVER (PARTITION BY r.schedule_id ORDER BY r.tick DESC) AS n
        FROM schedule_refusals r
        WHERE r.tenant = :tenant AND r.schedule_id = ANY(:ids::uuid[])
    ) latest
    WHERE n <= :keep
    """,
)


async def refusals(
    conn: asyncpg.Connection, tenant: str, schedule_ids: Sequence[uuid.UUID], keep: int
) -> list[asyncpg.Record]:
    """The latest ``keep`` refused ticks of each schedule: (schedule_id, tick, limit_name,
    refuse_time)."""
    if not schedule_ids:
        return []
    return await _REFUSALS.fetch(conn, tenant=tenant, ids=list(schedule_ids), keep=keep)


# -- the firer ---------------------------------------------------------------------------

DUE_COLUMNS = (
    "id", "tenant", "name", "cron", "time_zone", "version", "next_fire_time",
    "overlap_policy", "catch_up_policy", "catch_up_limit", "end_time", "buffered_tick",
    "previous_unfinished",
)  # fmt: skip
"""The columns of :func:`due`'s and :func:`due_at`'s rows, in order."""
_DUE_SELECT = columns(DUE_COLUMNS[:-1], "s")


def _due_sql(where: str) -> str:
    return f"""
    SELECT {_DUE_SELECT},
        coalesce(t.state NOT IN ({SUCCEEDED}, {DEAD}, {CANCELLED}), false)
            AS previous_unfinished
    FROM schedules s
    LEFT JOIN tasks t
        ON s.overlap_policy <> {OVERLAP_ALLOW} AND t.id = s.last_task_id
        AND t.tenant = s.tenant
    WHERE {where} AND NOT s.paused
        AND (s.wake_time <= :now OR s.overlap_policy = {OVERLAP_ALLOW})
    """


_DUE = Query(
    "due_schedules",
    _due_sql("s.wake_time <= :horizon")
    + "ORDER BY s.wake_time LIMIT :limit FOR UPDATE OF s SKIP LOCKED",
)
# Two upper bounds on the index's column: the scan ends at the lower one.
_DUE_BEFORE = Query(
    "due_schedules_before",
    _due_sql("s.wake_time <= :horizon AND s.wake_time < :before")
    + "ORDER BY s.wake_time LIMIT :limit FOR UPDATE OF s SKIP LOCKED",
)
_DUE_BY_IDS = Query(
    "due_schedules_by_ids",
    _due_sql("s.id = ANY(string_to_array(:ids, ',')::uuid[]) AND s.wake_time <= :horizon")
    + "FOR UPDATE OF s SKIP LOCKED",
)


async def due(
    conn: asyncpg.Connection,
    now: datetime,
    horizon: datetime,
    limit: int,
    *,
    before: datetime | None = None,
) -> list[asyncpg.Record]:
    """Locks up to ``limit`` schedules due, earliest first, for all tenants: by ``now``,
    or by ``horizon`` for ALLOW schedules (which the firer prepares ahead); with
    ``before``, only those whose ``wake_time`` is earlier (the index range ends there).

    ``previous_unfinished`` tells the overlap policies whether the latest firing's task is
    still unfinished; it is looked up only for schedules whose policy needs it.
    """
    if before is None:
        return await _DUE.fetch(conn, now=now, horizon=horizon, limit=limit)
    return await _DUE_BEFORE.fetch(conn, now=now, horizon=horizon, limit=limit, before=before)


async def due_by_ids(
    conn: asyncpg.Connection, ids: Sequence[str], now: datetime, horizon: datetime
) -> list[asyncpg.Record]:
    """:func:`due` for the schedules ``ids`` (canonical text) only, by primary key: those
    of them due are locked and returned (in no particular order), the others are left."""
    if not ids:
        return []
    return await _DUE_BY_IDS.fetch(conn, ids=",".join(ids), now=now, horizon=horizon)


_DUE_AT = Query(
    "due_schedules_at",
    f"""
    SELECT {_DUE_SELECT}, false AS previous_unfinished
    FROM schedules s
    WHERE s.wake_time = :tick AND NOT s.paused AND s.overlap_policy = {OVERLAP_ALLOW}
    LIMIT :limit
    FOR UPDATE OF s SKIP LOCKED
    """,
)


async def due_at(conn: asyncpg.Connection, tick: datetime, limit: int) -> list[asyncpg.Record]:
    """Locks up to ``limit`` ALLOW schedules whose ``wake_time`` is ``tick`` (a burst the
    firer prepares ahead), in the shape of :func:`due`."""
    return await _DUE_AT.fetch(conn, tick=tick, limit=limit)


_UPCOMING_TICKS = Query(
    "upcoming_schedule_ticks",
    f"""
    SELECT wake_time, count(*) AS n FROM schedules
    WHERE wake_time > :after AND wake_time <= :until AND NOT paused
        AND overlap_policy = {OVERLAP_ALLOW}
    GROUP BY wake_time
    HAVING count(*) >= :at_least
    ORDER BY wake_time
    """,
)


async def upcoming_ticks(
    conn: asyncpg.Connection, after: datetime, until: datetime, at_least: int
) -> list[tuple[datetime, int]]:
    """The ``wake_time`` values in (``after``, ``until``] that ``at_least`` ALLOW
    schedules share, earliest first, with how many share each."""
    rows = await _UPCOMING_TICKS.fetch(conn, after=after, until=until, at_least=at_least)
    return [(r["wake_time"], int(r["n"])) for r in rows]


_TEMPLATES = Query(
    "schedule_templates",
    "SELECT id, version, template FROM schedules WHERE id = ANY(:ids::uuid[])",
)


async def templates(
    conn: asyncpg.Connection, schedule_ids: Sequence[uuid.UUID]
) -> list[asyncpg.Record]:
    return await _TEMPLATES.fetch(conn, ids=list(schedule_ids))


# -- firings: the tasks of a batch of ticks ------------------------------------------------

_PER_FIRING = {"id", "state", "idempotency_key", "request_hash", "run_at"}
TEMPLATE_ARRAYS: tuple[tuple[str, str], ...] = tuple(
    (name, kind) for name, kind in NEW_TASK_ARRAYS if name not in _PER_FIRING
)
"""The columns a firing's task takes from its schedule's template (and tenant)."""
_FIRING_ARRAYS = (
    ("id", "uuid"),
    ("idempotency_key", "text"),
    ("run_at", "timestamptz"),
    ("template", "int"),
)
# The per-firing values cross as one comma-separated text each, split by PostgreSQL:
# asyncpg's array encoder makes a Python-level isinstance check per element (abc's
# __instancecheck__, 4.5 % of the coordinator's samples at 100,000 schedules), a string
# costs one copy. None of these values can hold a comma (ids, timestamps in ISO 8601,
# numbers, and keys made of those).
_FIRING_TEXTS = ", ".join(
    f"string_to_array(:{name}, ',')::{kind}[]"
    if kind != "text"
    else f"string_to_array(:{name}, ',')"
    for name, kind in _FIRING_ARRAYS
)
_FIRING_VALUES = {
    "id": "f.id",
    "state": str(PENDING),
    "idempotency_key": "f.idempotency_key",
    # A client resending with a firing's key is not sending this request.
    "request_hash": "NULL::bytea",
    "run_at": "f.run_at",
    "labels": "p.labels::jsonb",
}
_INSERT_FIRINGS = Query(
    "insert_schedule_firings",
    f"""
    WITH changed AS (
        INSERT INTO tasks AS t ({columns(NEW_TASK_COLUMNS)}, create_time, update_time)
        SELECT {", ".join(_FIRING_VALUES.get(n, f"p.{n}") for n in NEW_TASK_COLUMNS)},
            :now, :now
        FROM unnest({_FIRING_TEXTS}) AS f({columns(name for name, _ in _FIRING_ARRAYS)})
        JOIN (SELECT *, n::int AS template FROM unnest(
            {", ".join(f":t_{name}::{kind}[]" for name, kind in TEMPLATE_ARRAYS)})
            WITH ORDINALITY AS u({columns(name for name, _ in TEMPLATE_ARRAYS)}, n)) AS p
            USING (template)
        -- In key order, the unique index on keys takes the batch leaf by leaf instead of
        -- at random places: measurably less work for PostgreSQL.
        ORDER BY p.tenant, f.idempotency_key
        ON CONFLICT DO NOTHING
        RETURNING {changed(from_state=UNSPECIFIED)}
    ) {TAIL_NOT_FINISHING}
    """,
)


# Where the template's columns sit in a new task's row (NEW_TASK_COLUMNS order).
_TEMPLATE_AT = tuple(i for i, name in enumerate(NEW_TASK_COLUMNS) if name not in _PER_FIRING)


def template_values(tenant: str, task: NewTask) -> tuple[Any, ...]:
    """A template task's values in :data:`TEMPLATE_ARRAYS` order: the shared task
    insert's row (:func:`tasks.new_row_values`) less the per-firing columns, so the two
    cannot disagree. Computed once per schedule, shared by all its firings."""
    # The id, state and tick given are the per-firing columns' and are dropped.
    row = new_row_values(NewRow(tenant, "", task, PENDING, datetime.min))
    return tuple(row[i] for i in _TEMPLATE_AT)


async def insert_firings(
    conn: asyncpg.Connection,
    templates: Sequence[tuple[Any, ...]],
    ids: Sequence[str],
    keys: Sequence[str],
    ticks: Sequence[str],
    template_numbers: Sequence[str],
    now: datetime,
) -> list[asyncpg.Record]:
    """Inserts the tasks of a batch of firings, PENDING, each from its template (the
    ``template_numbers``, from "1", index ``templates``, each :func:`template_values`)
    with its own id, idempotency key and ``run_at`` (the tick, ISO 8601), all text
    without commas. Only these four values cross per firing; the templates are joined in
    SQL, so a batch of one expression's schedules sends their template once.

    What :func:`tasks.insert` does for submits, for the firer alone: a firing whose key
    is taken is skipped, and the same-transaction fragments run. Returns the transitions
    of the tasks inserted."""
    columns_of_templates = (
        zip(*templates, strict=True) if templates else ([] for _ in TEMPLATE_ARRAYS)
    )
    params: dict[str, Any] = {
        f"t_{name}": list(values)
        for (name, _), values in zip(TEMPLATE_ARRAYS, columns_of_templates, strict=True)
    }
    return await _INSERT_FIRINGS.fetch(
        conn,
        now=now,
        id=",".join(ids),
        idempotency_key=",".join(keys),
        run_at=",".join(ticks),
        template=",".join(template_numbers),
        **params,
    )


@dataclass(frozen=True)
class Advance:
    """A schedule's state after one round of the firer."""

    id: uuid.UUID | str
    """A UUID or its canonical text."""
    next_fire_time: datetime | None
    wake_time: datetime | None
    buffered_tick: datetime | None
    last_task_id: uuid.UUID | str | None
    """The newest firing's task; None leaves the column as it is."""


_ADVANCE_ARRAYS = (
    ("id", "uuid"),
    ("next_fire_time", "timestamptz"),
    ("wake_time", "timestamptz"),
    ("buffered_tick", "timestamptz"),
    ("last_task_id", "uuid"),
)
# As comma-separated text (see _FIRING_TEXTS), an empty element for NULL.
_ADVANCES = ", ".join(
    f"string_to_array(:{name}, ',', '')::{kind}[]" for name, kind in _ADVANCE_ARRAYS
)
_ADVANCE = Query(
    "advance_schedules",
    f"""
    UPDATE schedules s SET
        next_fire_time = r.next_fire_time, wake_time = r.wake_time,
        buffered_tick = r.buffered_tick,
        last_task_id = coalesce(r.last_task_id, s.last_task_id)
    FROM unnest({_ADVANCES}) AS r({columns(name for name, _ in _ADVANCE_ARRAYS)})
    WHERE s.id = r.id
    """,
)


@functools.lru_cache(maxsize=4096)
def _timestamp(moment: datetime | None) -> str:
    # Cached: a round's schedules mostly share their next tick.
    return "" if moment is None else moment.isoformat()


def _text(value: uuid.UUID | str | None) -> str:
    return "" if value is None else str(value)


async def advance(conn: asyncpg.Connection, rows: Sequence[Advance]) -> None:
    """Moves the schedules' cursors, in one statement."""
    await _ADVANCE.execute(
        conn,
        id=",".join(_text(r.id) for r in rows),
        next_fire_time=",".join(_timestamp(r.next_fire_time) for r in rows),
        wake_time=",".join(_timestamp(r.wake_time) for r in rows),
        buffered_tick=",".join(_timestamp(r.buffered_tick) for r in rows),
        last_task_id=",".join(_text(r.last_task_id) for r in rows),
    )


_NEXT_WAKE = Query(
    "next_schedule_wake",
    f"""
    SELECT
        (SELECT min(wake_time) FROM schedules
         WHERE NOT paused AND wake_time IS NOT NULL AND overlap_policy = {OVERLAP_ALLOW})
            AS allow,
        (SELECT min(wake_time) FROM schedules
         WHERE NOT paused AND wake_time IS NOT NULL AND overlap_policy <> {OVERLAP_ALLOW})
            AS other
    """,
)


async def next_wake(conn: asyncpg.Connection) -> tuple[datetime | None, datetime | None]:
    """The earliest wake_time of ALLOW schedules, and of the others."""
    row = await _NEXT_WAKE.fetchrow(conn)
    assert row is not None
    return row["allow"], row["other"]


@dataclass(frozen=True)
class Refusal:
    """A tick the firer did not fire: the tenant was over ``limit`` (a firing is a submit)."""

    schedule_id: uuid.UUID
    tenant: str
    tick: datetime
    limit: str


_REFUSAL_ARRAYS = (
    ("schedule_id", "uuid"),
    ("tenant", "text"),
    ("tick", "timestamptz"),
    ("limit_name", "text"),
)
_RECORD_REFUSALS = Query(
    "record_schedule_refusals",
    f"""
    INSERT INTO schedule_refusals (schedule_id, tenant, tick, limit_name, refuse_time)
    SELECT r.schedule_id, r.tenant, r.tick, r.limit_name, :now
    FROM {unnest(_REFUSAL_ARRAYS, "r")}
    ON CONFLICT (schedule_id, tick) DO NOTHING
    """,
)
# Older refusals than the schedules' latest :keep are of no use to anyone.
_PRUNE_REFUSALS = Query(
    "prune_schedule_refusals",
    """
    DELETE FROM schedule_refusals r
    WHERE r.schedule_id = ANY(:ids::uuid[]) AND r.tick < (
        SELECT x.tick FROM schedule_refusals x WHERE x.schedule_id = r.schedule_id
        ORDER BY x.tick DESC OFFSET :keep - 1 LIMIT 1)
    """,
)


async def record_refusals(
    conn: asyncpg.Connection, rows: Sequence[Refusal], now: datetime, keep: int
) -> None:
    """Records refused ticks, keeping each schedule's latest ``keep``: two statements,
    in rounds that refused something only."""
    await _RECORD_REFUSALS.execute(
        conn,
        now=now,
        **transpose(
            [(r.schedule_id, r.tenant, r.tick, r.limit) for r in rows],
            [name for name, _ in _REFUSAL_ARRAYS],
        ),
    )
    await _PRUNE_REFUSALS.execute(conn, ids=list({r.schedule_id for r in rows}), keep=keep)


_SET_ASIDE = Query(
    "set_schedules_aside",
    """
    UPDATE schedules s SET wake_time = NULL, buffered_tick = NULL, fault = r.fault
    FROM unnest(:ids::uuid[], :faults::text[]) AS r(id, fault)
    WHERE s.id = r.id
    """,
)


async def set_aside(conn: asyncpg.Connection, faults: Mapping[uuid.UUID, str]) -> None:
    """Takes schedules the firer could not use out of its rounds (``wake_time`` NULL), with
    the reason; UpdateSchedule and ResumeSchedule bring them back."""
    await _SET_ASIDE.execute(conn, ids=list(faults), faults=list(faults.values()))
