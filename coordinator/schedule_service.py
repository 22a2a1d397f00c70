"""``TaskService``'s schedule methods, as a mixin that ``TaskServicer`` inherits.

Every write checks the leader's epoch in its transaction (a schedule's cursor is
dispatch-side state) and wakes the firer after its commit, so a new or resumed schedule
fires its first tick on time without waiting for the firer's next round.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import grpc

from conveyor.coordinator import convert
from conveyor.coordinator import schedule_validation as check
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.cron import compile_cron, first_tick, next_fire_times, utc_now
from conveyor.coordinator.errors import (
    EtagMismatch,
    ScheduleAlreadyExists,
    ScheduleNotFound,
)
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.leader_rpc import leader_rpc
from conveyor.coordinator.schedule_firer import idempotency_key
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import schedules as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.v1 import schedule_pb2

_log = logging.getLogger("conveyor.coordinator.schedule_service")

NEXT_FIRE_TIMES = 5
RECENT_FIRINGS = 10


def _noop() -> None:
    return None


@dataclass(frozen=True)
class ScheduleHooks:
    """What the schedule methods need beyond TaskServicer's own state."""

    on_change: Callable[[], None] = _noop
    """Called after a commit that created, changed or resumed a schedule (wakes the firer)."""
    now: Callable[[], datetime] = utc_now
    """The clock (the firer's), for first ticks."""


class ScheduleServiceMixin:
    """CreateSchedule, GetSchedule, ListSchedules, UpdateSchedule, DeleteSchedule,
    PauseSchedule and ResumeSchedule."""

    # Set by TaskServicer.__init__.
    _pool: asyncpg.Pool
    _config: CoordinatorConfig
    _fence: Callable[[], Fence]
    _is_leader: Callable[[], bool]
    _leader_address: Callable[[], str]

    schedule_hooks: ScheduleHooks = ScheduleHooks()

    def configure_schedules(self, hooks: ScheduleHooks) -> None:
        self.schedule_hooks = hooks

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:  # type: ignore[type-arg]
        raise NotImplementedError  # TaskServicer's

    @leader_rpc
    async def CreateSchedule(
        self,
        request: schedule_pb2.CreateScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.CreateScheduleResponse:
        tenant = self._tenant(context)
        valid = check.validate_schedule(
            request.schedule, tenant=tenant, max_payload_bytes=self._config.max_payload_bytes
        )
        now = self.schedule_hooks.now()
        first = first_tick(valid.spec, now, valid.row.start_time)
        if first is not None and valid.row.end_time is not None and first >= valid.row.end_time:
            first = None
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                row = await store.insert(
                    conn, uuid7(), valid.row, paused=valid.paused, next_fire_time=first, now=now
                )
            if row is None:
                raise ScheduleAlreadyExists(valid.row.name)
            self.schedule_hooks.on_change()
            schedule = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.CreateScheduleResponse(schedule=schedule[0])

    @leader_rpc
    async def GetSchedule(
        self,
        request: schedule_pb2.GetScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.GetScheduleResponse:
        name = check.validate_name(request.name)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            row = await store.get(conn, tenant, name)
            if row is None:
                raise ScheduleNotFound(name)
            schedule = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.GetScheduleResponse(schedule=schedule[0])

    @leader_rpc
    async def ListSchedules(
        self,
        request: schedule_pb2.ListSchedulesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.ListSchedulesResponse:
        page = check.validate_list(request.page_size, request.page_token)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            rows = await store.list_page(conn, tenant, page.after_name, page.page_size)
            more = len(rows) > page.page_size
            rows = rows[: page.page_size]
            schedules = await self._schedule_messages(conn, tenant, rows)
        return schedule_pb2.ListSchedulesResponse(
            schedules=schedules,
            next_page_token=check.page_token(rows[-1]["name"]) if more else "",
        )

    @leader_rpc
    async def UpdateSchedule(
        self,
        request: schedule_pb2.UpdateScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.UpdateScheduleResponse:
        name = check.validate_name(request.schedule.name, "schedule.name")
        tenant = self._tenant(context)
        now = self.schedule_hooks.now()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                current = await store.get(conn, tenant, name, for_update=True)
                if current is None:
                    raise ScheduleNotFound(name)
                etag = _etag(current)
                if request.schedule.etag and request.schedule.etag != etag:
                    raise EtagMismatch(f"schedule {name!r}", request.schedule.etag, etag)
                merged, restart = check.apply_mask(
                    _stored_message(current), request.schedule, request.update_mask
                )
                valid = check.validate_schedule(
                    merged, tenant=tenant, max_payload_bytes=self._config.max_payload_bytes
                )
                first = None
                if restart:
                    first = first_tick(valid.spec, now, valid.row.start_time)
                    end = valid.row.end_time
                    if first is not None and end is not None and first >= end:
                        first = None
                row = await store.update(
                    conn, current["id"], valid.row, restart=restart, next_fire_time=first, now=now
                )
            self.schedule_hooks.on_change()
            schedule = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.UpdateScheduleResponse(schedule=schedule[0])

    @leader_rpc
    async def DeleteSchedule(
        self,
        request: schedule_pb2.DeleteScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.DeleteScheduleResponse:
        name = check.validate_name(request.name)
        async with self._pool.acquire() as conn, conn.transaction():
            await leadership.check_epoch(conn, self._fence())
            deleted = await store.delete(conn, self._tenant(context), name)
        if not deleted:
            raise ScheduleNotFound(name)
        return schedule_pb2.DeleteScheduleResponse()

    @leader_rpc
    async def PauseSchedule(
        self,
        request: schedule_pb2.PauseScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.PauseScheduleResponse:
        name = check.validate_name(request.name)
        tenant = self._tenant(context)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                row = await store.pause(conn, tenant, name, self.schedule_hooks.now())
            if row is None:
                raise ScheduleNotFound(name)
            schedule = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.PauseScheduleResponse(schedule=schedule[0])

    @leader_rpc
    async def ResumeSchedule(
        self,
        request: schedule_pb2.ResumeScheduleRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> schedule_pb2.ResumeScheduleResponse:
        name = check.validate_name(request.name)
        tenant = self._tenant(context)
        now = self.schedule_hooks.now()
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await leadership.check_epoch(conn, self._fence())
                row = await store.get(conn, tenant, name, for_update=True)
                if row is None:
                    raise ScheduleNotFound(name)
                if row["paused"]:
                    spec = compile_cron(row["cron"], row["time_zone"])
                    first = first_tick(spec, now, row["start_time"])
                    if first is not None and row["end_time"] is not None:
                        first = first if first < row["end_time"] else None
                    row = await store.resume(conn, tenant, row["id"], first, now)
            self.schedule_hooks.on_change()
            schedule = await self._schedule_messages(conn, tenant, [row])
        return schedule_pb2.ResumeScheduleResponse(schedule=schedule[0])

    async def _schedule_messages(
        self, conn: asyncpg.Connection, tenant: str, rows: Sequence[asyncpg.Record]
    ) -> list[schedule_pb2.Schedule]:
        """Schedule messages for rows, with next fire times and recent firings.

        Recent firings are found by key: the tasks of the schedule's last ticks (before
        its cursor), and its latest firing whatever its tick (keeping a list on the row
        would rewrite it at every tick).
        """
        now = self.schedule_hooks.now()
        keys: dict[str, tuple[uuid.UUID, datetime]] = {}
        for row in rows:
            spec = compile_cron(row["cron"], row["time_zone"])
            tick = row["next_fire_time"] or now
            for _ in range(RECENT_FIRINGS):
                tick = spec.prev_before(tick)
                if tick is None or tick < row["create_time"] - timedelta(seconds=1):
                    break
                keys[idempotency_key(row["id"], tick)] = (row["id"], tick)
        last_ids = [r["last_task_id"] for r in rows if r["last_task_id"] is not None]
        found = await store.firings(conn, tenant, list(keys), last_ids)
        by_schedule: dict[uuid.UUID, dict[datetime, asyncpg.Record]] = {}
        for task in found:
            key = task["idempotency_key"]
            if key in keys:
                schedule_id, tick = keys[key]
            else:  # a latest firing older than the ticks looked at
                _, schedule_text, tick_text = key.split(":", 2)
                schedule_id, tick = uuid.UUID(schedule_text), datetime.fromisoformat(tick_text)
            by_schedule.setdefault(schedule_id, {})[tick] = task
        out = []
        for row in rows:
            message = _stored_message(row)
            if not row["paused"]:
                spec = compile_cron(row["cron"], row["time_zone"])
                message.next_fire_times.extend(
                    convert.timestamp(t)
                    for t in next_fire_times(
                        spec, row["next_fire_time"], NEXT_FIRE_TIMES, row["end_time"]
                    )
                )
            firings = sorted(by_schedule.get(row["id"], {}).items(), reverse=True)
            message.recent_firings.extend(
                schedule_pb2.ScheduleFiring(
                    tick_time=convert.timestamp(tick),
                    task_id=str(task["id"]),
                    fire_time=convert.timestamp(task["create_time"]),
                    task_state=task["state"],
                )
                for tick, task in firings[:RECENT_FIRINGS]
            )
            out.append(message)
        return out


def _etag(row: asyncpg.Record) -> str:
    return str(row["version"])


def _stored_message(row: asyncpg.Record) -> schedule_pb2.Schedule:
    """The schedule as stored: what a client set, and the output-only identity fields."""
    return schedule_pb2.Schedule(
        name=row["name"],
        cron=row["cron"],
        time_zone=row["time_zone"],
        task_template=schedule_pb2.TaskTemplate.FromString(row["template"]),
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
    )
