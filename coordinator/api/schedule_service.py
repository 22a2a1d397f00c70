"""The schedule half of ``TaskService``: its own service object, built in one step.

``TaskServicer`` (the wire API, unchanged: schedules are TaskService methods) delegates
CreateSchedule, GetSchedule, ListSchedules, UpdateSchedule, DeleteSchedule, PauseSchedule
and ResumeSchedule here. Every write runs in a fenced transaction (a schedule's cursor is
dispatch-side state) and wakes the firer after its commit, so a new or resumed schedule
fires its first tick on time without waiting for the firer's next round.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta

import asyncpg
from google.protobuf.message import DecodeError

from conveyor.coordinator import convert
from conveyor.coordinator.api import context, pages
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import (
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
    ScheduleAlreadyExists,
    ScheduleNotFound,
)
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.schedules import validation as check
from conveyor.coordinator.schedules.cron import compile_cron, first_tick, next_fire_times
from conveyor.coordinator.schedules.firer import idempotency_key
from conveyor.coordinator.store import schedules as store
from conveyor.coordinator.tenancy.quotas import Quotas
from conveyor.v1 import schedule_pb2

_log = logging.getLogger("conveyor.coordinator.schedule_service")

NEXT_FIRE_TIMES = 5
RECENT_FIRINGS = 10


def _first(spec_tick: datetime | None, end: datetime | None) -> datetime | None:
    """The first tick, unless the schedule ends before it."""
    if spec_tick is not None and end is not None and spec_tick >= end:
        return None
    return spec_tick


class ScheduleService:
    """The schedule methods; ``now`` is the firer's clock (for first ticks), ``changed``
    wakes the firer (a schedule was created, changed or resumed)."""

    def __init__(
        self,
        deps: Deps,
        *,
        now: Callable[[], datetime],
        changed: Callable[[], None],
        quotas: Quotas,
    ) -> None:
        self._deps = deps
        self._now = now
        self._changed = changed
        self._quotas = quotas

    def _write(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A fenced transaction: a schedule's cursor is dispatch-side state."""
        return self._deps.db.write(self._deps.office.fence())

    async def create(
        self, request: schedule_pb2.CreateScheduleRequest
    ) -> schedule_pb2.CreateScheduleResponse:
        tenant = context.current().tenant
        valid = check.validate_schedule(
            request.schedule,
            tenant=tenant,
            max_payload_bytes=self._deps.config.max_payload_bytes,
        )
        schedule_id = check.validate_schedule_id(request.schedule.id)
        self._quotas.check_payload(tenant, len(request.schedule.task_template.payload))
        now = self._now()
        first = _first(first_tick(valid.spec, now, valid.row.start_time), valid.row.end_time)
        try:
            async with self._write() as conn:
                await self._quotas.admit_schedule(conn, tenant)
                row = await store.insert(
                    conn,
                    schedule_id or uuid7(),
                    valid.row,
                    paused=valid.paused,
                    next_fire_time=first,
                    now=now,
                )
        except asyncpg.UniqueViolationError as exc:
            if schedule_id is None or exc.constraint_name != "schedules_pkey":
                raise
            raise InvalidArgument(
                [
                    FieldViolation(
                        "schedule.id",
                        "is the id of another schedule: leave it empty, or choose a new UUID",
                    )
                ]
            ) from None
        if row is None:
            raise ScheduleAlreadyExists(valid.row.name)
        self._changed()
        return schedule_pb2.CreateScheduleResponse(schedule=await self._message(tenant, row))

    async def get(
        self, request: schedule_pb2.GetScheduleRequest
    ) -> schedule_pb2.GetScheduleResponse:
        name = check.validate_name(request.name)
        tenant = context.current().tenant
        async with self._deps.db.read() as conn:
            row = await store.get(conn, tenant, name)
            if row is None:
                raise ScheduleNotFound(name)
            (schedule,) = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.GetScheduleResponse(schedule=schedule)

    async def list_page(
        self, request: schedule_pb2.ListSchedulesRequest
    ) -> schedule_pb2.ListSchedulesResponse:
        page = check.validate_list(request.page_size, request.page_token)
        tenant = context.current().tenant
        async with self._deps.db.read() as conn:
            rows = await store.list_page(conn, tenant, page.after_name, page.page_size)
            rows, token = pages.page(
                rows, page.page_size, lambda last: check.page_token(last["name"])
            )
            schedules = await self._schedule_messages(conn, tenant, rows)
        return schedule_pb2.ListSchedulesResponse(schedules=schedules, next_page_token=token)

    async def update(
        self, request: schedule_pb2.UpdateScheduleRequest
    ) -> schedule_pb2.UpdateScheduleResponse:
        name = check.validate_name(request.schedule.name, "schedule.name")
        tenant = context.current().tenant
        now = self._now()
        async with self._write() as conn:
            current = await _locked(conn, tenant, name)
            etag = _etag(current)
            if request.schedule.etag and request.schedule.etag != etag:
                raise EtagMismatch(f"schedule {name!r}", request.schedule.etag, etag)
            merged, restart = check.apply_mask(
                _stored_message(current), request.schedule, request.update_mask
            )
            valid = check.validate_schedule(
                merged, tenant=tenant, max_payload_bytes=self._deps.config.max_payload_bytes
            )
            self._quotas.check_payload(tenant, len(merged.task_template.payload))
            first = None
            # A schedule the firer set aside restarts with any change: it is back in service.
            restart = restart or current["fault"] is not None
            if restart:
                first = _first(
                    first_tick(valid.spec, now, valid.row.start_time), valid.row.end_time
                )
            row = await store.update(
                conn, current["id"], valid.row, restart=restart, next_fire_time=first, now=now
            )
        self._changed()
        return schedule_pb2.UpdateScheduleResponse(schedule=await self._message(tenant, row))

    async def delete(
        self, request: schedule_pb2.DeleteScheduleRequest
    ) -> schedule_pb2.DeleteScheduleResponse:
        name = check.validate_name(request.name)
        async with self._write() as conn:
            deleted = await store.delete(conn, context.current().tenant, name)
        if not deleted:
            raise ScheduleNotFound(name)
        return schedule_pb2.DeleteScheduleResponse()

    async def pause(
        self, request: schedule_pb2.PauseScheduleRequest
    ) -> schedule_pb2.PauseScheduleResponse:
        name = check.validate_name(request.name)
        tenant = context.current().tenant
        async with self._write() as conn:
            row = await store.pause(conn, tenant, name, self._now())
        if row is None:
            raise ScheduleNotFound(name)
        return schedule_pb2.PauseScheduleResponse(schedule=await self._message(tenant, row))

    async def resume(
        self, request: schedule_pb2.ResumeScheduleRequest
    ) -> schedule_pb2.ResumeScheduleResponse:
        name = check.validate_name(request.name)
        tenant = context.current().tenant
        now = self._now()
        async with self._write() as conn:
            row = await _locked(conn, tenant, name)
            if row["paused"] or row["fault"] is not None:
                if row["fault"] is not None:
                    # Set aside by the firer: resumed only if what is stored is usable
                    # (else INVALID_ARGUMENT names it, to change with UpdateSchedule).
                    check.validate_schedule(
                        _stored_message(row),
                        tenant=tenant,
                        max_payload_bytes=self._deps.config.max_payload_bytes,
                    )
                spec = compile_cron(row["cron"], row["time_zone"])
                first = _first(first_tick(spec, now, row["start_time"]), row["end_time"])
                row = await store.resume(conn, tenant, row["id"], first, now)
        self._changed()
        return schedule_pb2.ResumeScheduleResponse(schedule=await self._message(tenant, row))

    async def _message(self, tenant: str, row: asyncpg.Record) -> schedule_pb2.Schedule:
        async with self._deps.db.read() as conn:
            (schedule,) = await self._schedule_messages(conn, tenant, [row])
        return schedule

    async def _schedule_messages(
        self, conn: asyncpg.Connection, tenant: str, rows: Sequence[asyncpg.Record]
    ) -> list[schedule_pb2.Schedule]:
        """Schedule messages for rows, with next fire times and recent firings.

        Recent firings are found by key: the tasks of the schedule's last ticks (before
        its cursor), and its latest firing whatever its tick (keeping a list on the row
        would rewrite it at every tick); and the ticks its tenant's limits refused.
        """
        now = self._now()
        keys: dict[str, tuple[uuid.UUID, datetime]] = {}
        for row in rows:
            if row["fault"] is not None:
                continue  # set aside: its stored cron or zone may be what it could not use
            spec = compile_cron(row["cron"], row["time_zone"])
            tick = row["next_fire_time"] or now
            for _ in range(RECENT_FIRINGS):
                tick = spec.prev_before(tick)
                if tick is None or tick < row["create_time"] - timedelta(seconds=1):
                    break
                keys[idempotency_key(row["id"], tick)] = (row["id"], tick)
        last_ids = [r["last_task_id"] for r in rows if r["last_task_id"] is not None]
        found = await store.firings(conn, tenant, list(keys), last_ids)
        by_schedule: dict[uuid.UUID, dict[datetime, schedule_pb2.ScheduleFiring]] = {}
        refused = await store.refusals(conn, tenant, [r["id"] for r in rows], RECENT_FIRINGS)
        for refusal in refused:
            by_schedule.setdefault(refusal["schedule_id"], {})[refusal["tick"]] = (
                schedule_pb2.ScheduleFiring(
                    tick_time=convert.timestamp(refusal["tick"]),
                    fire_time=convert.timestamp(refusal["refuse_time"]),
                    refused_limit=refusal["limit_name"],
                )
            )
        for task in found:
            key = task["idempotency_key"]
            if key in keys:
                schedule_id, tick = keys[key]
            else:  # a latest firing older than the ticks looked at
                _, schedule_text, tick_text = key.split(":", 2)
                schedule_id, tick = uuid.UUID(schedule_text), datetime.fromisoformat(tick_text)
            by_schedule.setdefault(schedule_id, {})[tick] = schedule_pb2.ScheduleFiring(
                tick_time=convert.timestamp(tick),
                task_id=str(task["id"]),
                fire_time=convert.timestamp(task["create_time"]),
                task_state=task["state"],
            )
        out = []
        for row in rows:
            message = _stored_message(row)
            if not row["paused"] and row["fault"] is None:
                spec = compile_cron(row["cron"], row["time_zone"])
                message.next_fire_times.extend(
                    convert.timestamp(t)
                    for t in next_fire_times(
                        spec, row["next_fire_time"], NEXT_FIRE_TIMES, row["end_time"]
                    )
                )
            firings = sorted(by_schedule.get(row["id"], {}).items(), reverse=True)
            message.recent_firings.extend(firing for _, firing in firings[:RECENT_FIRINGS])
            out.append(message)
        return out


async def _locked(conn: asyncpg.Connection, tenant: str, name: str) -> asyncpg.Record:
    """The schedule, locked for the transaction; ScheduleNotFound when there is none."""
    row = await store.get(conn, tenant, name, for_update=True)
    if row is None:
        raise ScheduleNotFound(name)
    return row


def _etag(row: asyncpg.Record) -> str:
    return str(row["version"])


def _stored_message(row: asyncpg.Record) -> schedule_pb2.Schedule:
    """The schedule as stored: what a client set, and the output-only identity fields."""
    try:
        template = schedule_pb2.TaskTemplate.FromString(row["template"])
    except DecodeError:  # written by hand; the firer sets such a schedule aside
        template = schedule_pb2.TaskTemplate()
    return schedule_pb2.Schedule(
        name=row["name"],
        cron=row["cron"],
        time_zone=row["time_zone"],
        task_template=template,
        overlap_policy=row["overlap_policy"],
        catch_up_policy=row["catch_up_policy"],
        catch_up_limit=row["catch_up_limit"],
        paused=row["paused"],
        start_time=convert.maybe_timestamp(row["start_time"]),
        end_time=convert.maybe_timestamp(row["end_time"]),
        id=str(row["id"]),
        create_time=convert.timestamp(row["create_time"]),
        update_time=convert.timestamp(row["update_time"]),
        etag=_etag(row),
        fault=row["fault"] or "",
    )
