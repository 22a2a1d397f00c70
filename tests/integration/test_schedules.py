"""Schedules against a real PostgreSQL: second-level ticks on time, pause/resume, the
overlap and catch-up policies, bad input, the API around them, and a coordinator killed
with SIGKILL around a tick (each tick still fires exactly once).

Ticks are whole seconds, so tests watch the database (the ground truth) with deadlines;
the only sleeps are downtimes a test imposes on purpose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest
from clitools import conveyor
from cluster import CoordinatorProcess
from google.protobuf import field_mask_pb2
from testsupport import (
    coordinator_config,
    error_details,
    eventually,
    leader_pool,
    service_deps,
    sleep_until,
)

from conveyor.client import AsyncClient, CatchUpPolicy, OverlapPolicy
from conveyor.coordinator import Coordinator
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.schedules.cron import first_tick
from conveyor.coordinator.schedules.firer import ScheduleFirer
from conveyor.coordinator.schedules.validation import validate_schedule
from conveyor.coordinator.store import schedules
from conveyor.v1 import schedule_pb2 as spb
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

# The aio stub type (type-checking only: the generated module has no such class at run time).
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
SECOND = timedelta(seconds=1)
EVERY_SECOND = "* * * * * *"


def _schedule(name: str, cron: str = EVERY_SECOND, **fields: Any) -> spb.Schedule:
    template = fields.pop("task_template", spb.TaskTemplate(type="tick", payload=b'"tick"'))
    return spb.Schedule(name=name, cron=cron, task_template=template, **fields)


async def _create(stub: Stub, name: str, cron: str = EVERY_SECOND, **fields: Any) -> spb.Schedule:
    response = await stub.CreateSchedule(
        spb.CreateScheduleRequest(schedule=_schedule(name, cron, **fields))
    )
    return response.schedule


async def _firings(db: asyncpg.Connection, schedule_id: str) -> list[asyncpg.Record]:
    """The schedule's tasks, by tick (run_at is the tick)."""
    rows: list[asyncpg.Record] = await db.fetch(
        """
        SELECT id, idempotency_key, run_at, create_time, state FROM tasks
        WHERE idempotency_key LIKE 'schedule:' || $1 || ':%' ORDER BY run_at
        """,
        schedule_id,
    )
    return rows


def _ticks(rows: list[asyncpg.Record]) -> list[datetime]:
    return [r["run_at"] for r in rows]


def _fired(db: asyncpg.Connection, schedule_id: str, count: int) -> Callable[[], Any]:
    async def check() -> list[asyncpg.Record] | None:
        rows = await _firings(db, schedule_id)
        return rows if len(rows) >= count else None

    return check


def _details(err: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo.reason, BadRequest fields) of a rich error status."""
    details = error_details(err)
    return details.reason, details.fields


def _contiguous(ticks: list[datetime]) -> bool:
    return all(b - a == SECOND for a, b in itertools.pairwise(ticks))


# -- firing --------------------------------------------------------------------------------


async def test_second_level_schedules_fire_on_time(stub: Stub, db: asyncpg.Connection) -> None:
    every = await _create(stub, "every-second")
    even = await _create(stub, "even-seconds-berlin", "*/2 * * * * *", time_zone="Europe/Berlin")
    assert every.id and every.etag and len(every.next_fire_times) == 5
    assert [
        t.ToDatetime() - every.next_fire_times[0].ToDatetime() for t in every.next_fire_times
    ] == [SECOND * i for i in range(5)]

    rows = await eventually(_fired(db, every.id, 4), timeout=10)
    ticks = _ticks(rows)
    assert _contiguous(ticks) and all(t.microsecond == 0 for t in ticks)
    for row in rows:
        tick = row["run_at"]
        assert row["idempotency_key"] == f"schedule:{every.id}:{tick:%Y-%m-%dT%H:%M:%S}Z"
        assert row["state"] == task_pb2.TASK_STATE_PENDING
        # On time: committed within a second of the tick (typically a few ms).
        assert timedelta(0) <= row["create_time"] - tick < SECOND, row
    even_rows = await eventually(_fired(db, even.id, 2), timeout=10)
    assert all(t.second % 2 == 0 for t in _ticks(even_rows))

    got = (await stub.GetSchedule(spb.GetScheduleRequest(name="every-second"))).schedule
    recent = [(f.tick_time.ToDatetime(tzinfo=UTC), f.task_id) for f in got.recent_firings]
    # The firer keeps firing meanwhile: compare with the firings up to the newest it showed.
    fired = await _firings(db, every.id)
    assert len(recent) >= len(rows)
    assert (
        recent
        == sorted(
            ((r["run_at"], str(r["id"])) for r in fired if r["run_at"] <= recent[0][0]),
            reverse=True,
        )[: len(recent)]
    )
    assert all(f.task_state == task_pb2.TASK_STATE_PENDING for f in got.recent_firings)
    assert got.next_fire_times[0].ToDatetime(tzinfo=UTC) > recent[0][0]


async def test_pause_and_resume(stub: Stub, db: asyncpg.Connection) -> None:
    clock = await _create(stub, "clock")  # an unpaused schedule, to watch time pass
    paused = await _create(stub, "pausable")
    await eventually(_fired(db, paused.id, 1), timeout=10)

    response = await stub.PauseSchedule(spb.PauseScheduleRequest(name="pausable"))
    assert response.schedule.paused and not response.schedule.next_fire_times
    again = await stub.PauseSchedule(spb.PauseScheduleRequest(name="pausable"))
    assert again.schedule.etag == response.schedule.etag  # pausing twice changes nothing
    before = len(await _firings(db, paused.id))
    clock_before = len(await _firings(db, clock.id))
    # Three ticks pass for the clock while the other schedule is paused.
    await eventually(_fired(db, clock.id, clock_before + 3), timeout=10)
    assert len(await _firings(db, paused.id)) == before
    last_before_pause = _ticks(await _firings(db, paused.id))[-1]

    resumed_at = datetime.now(UTC)
    resumed = (await stub.ResumeSchedule(spb.ResumeScheduleRequest(name="pausable"))).schedule
    assert not resumed.paused
    assert resumed.next_fire_times[0].ToDatetime(tzinfo=UTC) > resumed_at
    rows = await eventually(_fired(db, paused.id, before + 2), timeout=10)
    after = [t for t in _ticks(rows) if t > last_before_pause]
    # Ticks that passed while paused are not caught up.
    assert after[0] > resumed_at and _contiguous(after)


async def test_overlap_policies(stub: Stub, db: asyncpg.Connection) -> None:
    """Nobody consumes the tasks, so a firing stays unfinished until the test cancels it."""
    clock = await _create(stub, "clock")
    allow = await _create(stub, "allow", overlap_policy=spb.OVERLAP_POLICY_ALLOW)
    skip = await _create(stub, "skip", overlap_policy=spb.OVERLAP_POLICY_SKIP)
    buffer = await _create(stub, "buffer", overlap_policy=spb.OVERLAP_POLICY_BUFFER_ONE)
    (first_skip,) = await eventually(_fired(db, skip.id, 1), timeout=10)
    (first_buffer,) = await eventually(_fired(db, buffer.id, 1), timeout=10)
    start = len(await _firings(db, clock.id))
    await eventually(_fired(db, clock.id, start + 3), timeout=10)

    # ALLOW fired every tick although its earlier tasks are still pending.
    assert _contiguous(_ticks(await _firings(db, allow.id)))
    assert len(await _firings(db, allow.id)) >= 3
    # SKIP and BUFFER_ONE fired nothing more while their first task was unfinished.
    assert len(await _firings(db, skip.id)) == 1
    assert len(await _firings(db, buffer.id)) == 1

    for task in (first_skip, first_buffer):
        await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=str(task["id"])))
    cancelled_at = datetime.now(UTC)

    # SKIP fires again at the next tick; the ticks in between were skipped for good.
    skip_rows = await eventually(_fired(db, skip.id, 2), timeout=10)
    assert skip_rows[1]["run_at"] >= cancelled_at - SECOND
    # BUFFER_ONE fires the one tick it kept waiting: the tick right after its first one.
    buffer_rows = await eventually(_fired(db, buffer.id, 2), timeout=10)
    assert buffer_rows[1]["run_at"] == first_buffer["run_at"] + SECOND
    # Created by a round after the cancel: a task's create time is its round's clock,
    # read before the round's select saw the cancel (16 ms before `cancelled_at` once in
    # CI), while firing at its own tick would have made it 2 s or more earlier.
    assert buffer_rows[1]["create_time"] >= cancelled_at - SECOND / 2
    # ... and keeps the next one waiting behind that (still unfinished) firing.
    start = len(await _firings(db, clock.id))
    await eventually(_fired(db, clock.id, start + 2), timeout=10)
    assert len(await _firings(db, buffer.id)) == 2
    assert len(await _firings(db, skip.id)) == 2
    row = await db.fetchrow("SELECT buffered_tick FROM schedules WHERE name = 'buffer'")
    assert row["buffered_tick"] is not None


async def test_catch_up_policies_after_downtime(
    coordinator: Coordinator, database_dsn: str, stub: Stub, db: asyncpg.Connection
) -> None:
    policies = {
        "skip": spb.CATCH_UP_POLICY_SKIP,
        "fire-once": spb.CATCH_UP_POLICY_FIRE_ONCE,
        "fire-all-2": spb.CATCH_UP_POLICY_FIRE_ALL,
        "fire-all": spb.CATCH_UP_POLICY_FIRE_ALL,
    }
    ids = {}
    for name, policy in policies.items():
        limit = 2 if name == "fire-all-2" else 0
        created = await _create(stub, name, catch_up_policy=policy, catch_up_limit=limit)
        ids[name] = created.id
    for schedule_id in ids.values():
        await eventually(_fired(db, schedule_id, 1), timeout=10)

    await coordinator.stop(grace=1.0)
    last_fired = {n: _ticks(await _firings(db, i))[-1] for n, i in ids.items()}
    # The downtime: no coordinator at all until four ticks past the last firing, so that
    # at least three are missed before the successor's grace period.
    await sleep_until(max(last_fired.values()) + 4 * SECOND + timedelta(milliseconds=500))
    successor = Coordinator(coordinator_config(database_dsn))
    await successor.start()
    try:
        assert successor.schedule_firer is not None
        missed_before = successor.schedule_firer.missed_before
        for schedule_id in ids.values():

            async def caught_up(schedule_id: str = schedule_id) -> bool:
                ticks = _ticks(await _firings(db, schedule_id))
                return bool(ticks) and ticks[-1] >= missed_before + 2 * SECOND

            await eventually(caught_up, timeout=10)
    finally:
        await successor.stop(grace=1.0)

    for name, schedule_id in ids.items():
        ticks = _ticks(await _firings(db, schedule_id))
        assert len(set(ticks)) == len(ticks)
        missed = []
        tick = last_fired[name] + SECOND
        while tick < missed_before:
            missed.append(tick)
            tick += SECOND
        assert len(missed) >= 3, (name, last_fired[name], missed_before)
        fired_missed = [t for t in ticks if last_fired[name] < t < missed_before]
        expected = {
            "skip": [],
            "fire-once": missed[-1:],
            "fire-all-2": missed[-2:],
            "fire-all": missed,
        }[name]
        assert fired_missed == expected, name
        # Every tick from the grace period on fired, once.
        on_time = [t for t in ticks if t >= missed_before]
        assert on_time[0] < missed_before + SECOND and _contiguous(on_time), name


async def test_the_firer_across_fall_back_with_an_injected_clock(database_dsn: str) -> None:
    """The firing loop itself, on a fake clock walked through New York's 2025 fall-back:
    the repeated hour fires once, and nothing waits for real time."""
    start = datetime(2025, 11, 2, 4, 50, tzinfo=UTC)  # 00:50 EDT
    clock = [start]
    pool, epoch = await leader_pool(database_dsn)
    try:
        async with pool.acquire() as conn:
            valid = validate_schedule(
                _schedule("ny", "0 */20 * * * *", time_zone="America/New_York"),
                tenant="default",
                max_payload_bytes=1024,
            )
            first = first_tick(valid.spec, start, None)
            await schedules.insert(
                conn, uuid7(), valid.row, paused=False, next_fire_time=first, now=start
            )
        firer = ScheduleFirer(
            service_deps(pool, database_dsn, epoch=epoch), now=lambda: clock[0], max_lookahead=0
        )
        firer.started = start
        while clock[0] < datetime(2025, 11, 2, 8, 30, tzinfo=UTC):  # 03:30 EST
            await firer.run_once()
            clock[0] += timedelta(minutes=1)
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT run_at, create_time FROM tasks ORDER BY run_at")
    finally:
        await pool.close()
    new_york = ZoneInfo("America/New_York")
    wall = [r["run_at"].astimezone(new_york).strftime("%H:%M%z") for r in rows]
    assert wall == [
        "01:00-0400",
        "01:20-0400",
        "01:40-0400",
        # 01:00-01:59 EST repeats the hour: no second firing.
        "02:00-0500",
        "02:20-0500",
        "02:40-0500",
        "03:00-0500",
        "03:20-0500",
    ]
    # Each fired within the fake minute it fell due.
    assert all(timedelta(0) <= r["create_time"] - r["run_at"] < timedelta(minutes=1) for r in rows)


async def test_a_firer_behind_locks_fewer_schedules_per_batch(database_dsn: str) -> None:
    """Schedules that are behind fire several ticks each: the rounds then lock fewer per
    batch, so a transaction's firings stay near batch_size (a batch of 20 ticks a
    schedule was long enough on a starved machine to be killed by the pool's idle
    timeout), and every tick still fires once. On a fake clock, 20 s behind twice."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    clock = [start]
    pool, epoch = await leader_pool(database_dsn)
    try:
        async with pool.acquire() as conn:
            for i in range(10):
                valid = validate_schedule(
                    _schedule(f"behind-{i}"), tenant="default", max_payload_bytes=1024
                )
                await schedules.insert(
                    conn, uuid7(), valid.row, paused=False, next_fire_time=start, now=start
                )
        firer = ScheduleFirer(
            service_deps(pool, database_dsn, epoch=epoch),
            now=lambda: clock[0],
            max_lookahead=0,
            batch_size=10,
            parallel=1,
        )
        firer.started = start
        sizes: list[list[int]] = []
        for _ in range(2):
            before = clock[0] - SECOND if clock[0] == start else clock[0]
            clock[0] += timedelta(seconds=19)
            await firer.run_once()
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    """
                    SELECT xmin::text::bigint AS tx, count(*) AS n FROM tasks
                    WHERE idempotency_key LIKE 'schedule:%' AND run_at > $1
                    GROUP BY 1 ORDER BY 1
                    """,
                    before,
                )
            sizes.append([r["n"] for r in rows])
        async with pool.acquire() as conn:
            keys = await conn.fetch("SELECT idempotency_key, run_at FROM tasks")
    finally:
        await pool.close()
    # The first batch, before anything was learned: all ten schedules, 20 ticks each.
    assert sizes[0] == [200], sizes
    # Then one schedule (20 firings) per batch, each batch its own transaction.
    assert sizes[1] == [19] * 10, sizes
    assert len({r["idempotency_key"] for r in keys}) == len(keys) == 390
    assert {r["run_at"] for r in keys} == {start + SECOND * k for k in range(39)}


# -- the API -------------------------------------------------------------------------------


async def test_bad_input_writes_nothing(stub: Stub, db: asyncpg.Connection) -> None:
    cases: list[tuple[spb.Schedule, set[str]]] = [
        (_schedule("bad-cron", "61 * * * *"), {"schedule.cron"}),
        (_schedule("short-cron", "* * *"), {"schedule.cron"}),
        (_schedule("never", "0 0 31 2 *"), {"schedule.cron"}),
        (_schedule("zone", time_zone="Mars/Olympus_Mons"), {"schedule.time_zone"}),
        (_schedule("", "* * * * *"), {"schedule.name"}),
        (_schedule("bad name!"), {"schedule.name"}),
        (
            _schedule(
                "template",
                task_template=spb.TaskTemplate(type="", queue="no spaces", priority=5000),
            ),
            {
                "schedule.task_template.type",
                "schedule.task_template.queue",
                "schedule.task_template.priority",
            },
        ),
        (spb.Schedule(name="no-template", cron="* * * * *"), {"schedule.task_template"}),
        (_schedule("policy", overlap_policy=42), {"schedule.overlap_policy"}),
        (_schedule("limit", catch_up_limit=10**6), {"schedule.catch_up_limit"}),
        # What PostgreSQL would refuse, or no worker could name (issue 7.3).
        (_schedule("nightly\n"), {"schedule.name"}),
        (_schedule("nul-cron", "* * * * *\x00"), {"schedule.cron"}),
        (_schedule("nul-zone", time_zone="UTC\x00"), {"schedule.time_zone"}),
        (
            _schedule("nul-label", task_template=spb.TaskTemplate(type="t", labels={"k": "v\x00"})),
            {"schedule.task_template.labels['k']"},
        ),
    ]
    window = _schedule("window")
    window.start_time.FromDatetime(datetime(2030, 1, 2, tzinfo=UTC))
    window.end_time.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    cases.append((window, {"schedule.end_time"}))
    for schedule, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, schedule
        reason, named = _details(caught.value)
        assert reason == "INVALID_ARGUMENT"
        assert set(named) == fields, (schedule, named)
    assert await db.fetchval("SELECT count(*) FROM schedules") == 0

    await _create(stub, "taken", "0 * * * *")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(stub, "taken", "*/5 * * * *")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _details(caught.value)[0] == "SCHEDULE_ALREADY_EXISTS"
    assert await db.fetchval("SELECT cron FROM schedules") == "0 * * * *"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSchedules(spb.ListSchedulesRequest(page_token="bmFtZQBudWw="))  # name\0nul
    assert _details(caught.value)[1] == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSchedule(spb.GetScheduleRequest(name="taken\n"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: stub.GetSchedule(spb.GetScheduleRequest(name="missing")),
        lambda: stub.PauseSchedule(spb.PauseScheduleRequest(name="missing")),
        lambda: stub.ResumeSchedule(spb.ResumeScheduleRequest(name="missing")),
        lambda: stub.DeleteSchedule(spb.DeleteScheduleRequest(name="missing")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _details(caught.value)[0] == "SCHEDULE_NOT_FOUND"


async def test_the_firer_survives_a_bug_in_one_round(
    coordinator: Coordinator, stub: Stub, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The firer ended on any exception that was not a database error, and nothing restarted
    it until the next election (issue 7.11). Now a bad round is logged, counted, retried."""
    firer = coordinator.schedule_firer
    assert firer is not None
    original = ScheduleFirer._fire
    calls = 0

    async def flaky(self: ScheduleFirer, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ZeroDivisionError("a bug in one round")
        return await original(self, *args)

    monkeypatch.setattr(ScheduleFirer, "_fire", flaky)
    created = await _create(stub, "survivor")
    await asyncio.wait_for(firer.wait_until(lambda f: f.failures >= 1), 10)
    assert isinstance(firer.last_error, ZeroDivisionError)
    await eventually(_fired(db, created.id, 2), timeout=10)
    assert firer.running


async def test_update_list_and_delete(stub: Stub, db: asyncpg.Connection) -> None:
    created = await _create(stub, "hourly", "0 * * * *", time_zone="Europe/Berlin")
    for i in range(3):
        await _create(stub, f"other-{i}", "0 0 * * *")

    # A template field alone: the cursor stays.
    mask = field_mask_pb2.FieldMask(paths=["task_template.payload"])
    patch = spb.Schedule(name="hourly", task_template=spb.TaskTemplate(payload=b'{"v": 2}'))
    updated = (
        await stub.UpdateSchedule(spb.UpdateScheduleRequest(schedule=patch, update_mask=mask))
    ).schedule
    assert updated.task_template.payload == b'{"v": 2}' and updated.task_template.type == "tick"
    assert updated.cron == "0 * * * *" and updated.etag != created.etag
    assert updated.next_fire_times == created.next_fire_times

    # The expression: the schedule restarts from now, and fires on the new one.
    mask = field_mask_pb2.FieldMask(paths=["cron", "overlap_policy"])
    patch = spb.Schedule(
        name="hourly", cron=EVERY_SECOND, overlap_policy=spb.OVERLAP_POLICY_SKIP, etag=updated.etag
    )
    updated = (
        await stub.UpdateSchedule(spb.UpdateScheduleRequest(schedule=patch, update_mask=mask))
    ).schedule
    assert updated.overlap_policy == spb.OVERLAP_POLICY_SKIP
    nexts = [t.ToDatetime(tzinfo=UTC) for t in updated.next_fire_times]
    assert nexts[1] - nexts[0] == SECOND
    await eventually(_fired(db, created.id, 1), timeout=10)

    # A stale etag, and fields that cannot be updated, are refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateSchedule(
            spb.UpdateScheduleRequest(
                schedule=spb.Schedule(name="hourly", cron="0 * * * *", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert _details(caught.value)[0] == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateSchedule(
            spb.UpdateScheduleRequest(
                schedule=spb.Schedule(name="hourly", paused=True),
                update_mask=field_mask_pb2.FieldMask(paths=["paused", "cron"]),
            )
        )
    assert _details(caught.value) == ("INVALID_ARGUMENT", ["update_mask.paths[0]"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateSchedule(
            spb.UpdateScheduleRequest(
                schedule=spb.Schedule(name="hourly", cron="not cron"),
                update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
            )
        )
    assert _details(caught.value) == ("INVALID_ARGUMENT", ["schedule.cron"])
    assert await db.fetchval("SELECT cron FROM schedules WHERE name = 'hourly'") == EVERY_SECOND

    names: list[str] = []
    token = ""
    while True:
        page = await stub.ListSchedules(spb.ListSchedulesRequest(page_size=3, page_token=token))
        names += [s.name for s in page.schedules]
        token = page.next_page_token
        if not token:
            break
    assert names == ["hourly", "other-0", "other-1", "other-2"]

    await stub.DeleteSchedule(spb.DeleteScheduleRequest(name="hourly"))
    assert await db.fetchval("SELECT count(*) FROM schedules WHERE name = 'hourly'") == 0
    # Its tasks stay.
    assert len(await _firings(db, created.id)) >= 1


async def test_python_client_and_cli(coordinator: Coordinator, db: asyncpg.Connection) -> None:
    async with AsyncClient(coordinator.address) as client:
        schedule = await client.create_schedule(
            "report",
            "0 9 * * 1-5",
            "send-report",
            {"to": "ops"},
            time_zone="America/New_York",
            overlap_policy="skip",
            catch_up_policy=CatchUpPolicy.FIRE_ALL,
            catch_up_limit=5,
            timeout=60,
        )
        assert schedule.overlap_policy is OverlapPolicy.SKIP
        assert schedule.catch_up_policy is CatchUpPolicy.FIRE_ALL
        assert schedule.json() == {"to": "ops"} and schedule.timeout == timedelta(seconds=60)
        assert [t.astimezone().hour for t in schedule.next_fire_times]  # computed
        assert all(
            t.astimezone(datetime.now().astimezone().tzinfo) for t in schedule.next_fire_times
        )
        updated = await client.update_schedule("report", payload={"to": "dev"}, etag=schedule.etag)
        assert updated.json() == {"to": "dev"} and updated.type == "send-report"
        assert (await client.pause_schedule("report")).paused
        assert not (await client.resume_schedule("report")).paused
        page = await client.list_schedules()
        assert [s.name for s in page] == ["report"]

    where = ["--coordinator", coordinator.address]
    result = await conveyor(
        *where, "schedules", "create", "ticker", EVERY_SECOND, "tick", '{"n": 1}',
        "--overlap", "buffer-one", "--catch-up", "skip", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    created = json.loads(result.out)
    assert created["overlap_policy"] == "BUFFER_ONE" and created["payload"] == {"n": 1}
    await eventually(_fired(db, created["id"], 1), timeout=10)
    result = await conveyor(*where, "schedules", "get", "ticker")
    assert result.code == 0, result.err
    assert "last firings:" in result.out and "buffer-one" in result.out
    result = await conveyor(*where, "schedules", "list")
    assert result.code == 0 and "report" in result.out and "ticker" in result.out
    result = await conveyor(*where, "schedules", "pause", "ticker")
    assert result.code == 0 and "paused" in result.out
    result = await conveyor(*where, "schedules", "resume", "ticker")
    assert result.code == 0 and "resumed" in result.out
    result = await conveyor(*where, "schedules", "delete", "ticker")
    assert result.code == 0
    result = await conveyor(*where, "schedules", "get", "ticker")
    assert result.code == 1 and "Traceback" not in result.err
    assert "does not exist" in result.err or "no schedule named" in result.err
    result = await conveyor(*where, "schedules", "create", "x", "61 * * * *", "t")
    assert result.code == 1 and "schedule.cron" in result.err


# -- a coordinator killed around a tick ----------------------------------------------------


class CoordinatorProcesses:
    """Coordinator processes on one database, one after the other, the leader killed on
    demand. Single-node: each takes a new epoch when it starts, so "failover" is starting
    the next one (the etcd variant is test_failover.py's)."""

    def __init__(self, dsn: str, logs: Path) -> None:
        self.dsn = dsn
        self.logs = logs
        self.started: list[CoordinatorProcess] = []

    @property
    def leader(self) -> CoordinatorProcess:
        return self.started[-1]

    async def start(self) -> None:
        """Starts the next coordinator and waits until it serves (it has taken office)."""
        name = f"coordinator-{len(self.started)}"
        process = CoordinatorProcess(
            self.dsn, None, log_dir=self.logs, name=name, log_level="warning"
        )
        self.started.append(process.start())
        await process.wait_serving()

    def close(self) -> None:
        for process in self.started:
            process.close()


@pytest.fixture
async def processes(database_dsn: str, tmp_path: Path) -> AsyncIterator[CoordinatorProcesses]:
    cluster = CoordinatorProcesses(database_dsn, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.slow
async def test_coordinator_killed_around_a_tick_fires_each_tick_once(
    processes: CoordinatorProcesses, database_dsn: str
) -> None:
    """Many schedules make each tick's transaction long enough to be killed inside it."""
    count = 300
    await processes.start()
    db = await asyncpg.connect(database_dsn)
    try:
        async with AsyncClient(processes.leader.address) as client:
            names = [f"k-{i:03d}" for i in range(count)]
            for chunk in range(0, count, 50):
                await asyncio.gather(
                    *(
                        client.create_schedule(
                            n, EVERY_SECOND, "tick", b"", raw=True, catch_up_policy="fire_all"
                        )
                        for n in names[chunk : chunk + 50]
                    )
                )

        async def all_fired_through(moment: datetime) -> bool:
            behind: int = await db.fetchval(
                "SELECT count(*) FROM schedules WHERE next_fire_time <= $1", moment
            )
            return behind == 0

        async def took_office_after(epoch: int) -> bool:
            current: int = await db.fetchval("SELECT epoch FROM leadership")
            return current != epoch

        epochs = [await db.fetchval("SELECT epoch FROM leadership")]
        # Kill just before, at and just after tick boundaries: the firing transaction of
        # that tick is not started, in flight or committing.
        for offset in (0.004, -0.01, 0.025, 0.06):
            boundary = datetime.now(UTC).replace(microsecond=0) + 2 * SECOND
            await sleep_until(boundary + timedelta(seconds=offset))
            processes.leader.kill()
            await processes.start()
            # SERVING comes with the port; a single node takes office just after it.
            await eventually(functools.partial(took_office_after, epochs[-1]), timeout=15)
            epochs.append(await db.fetchval("SELECT epoch FROM leadership"))
            await eventually(functools.partial(all_fired_through, boundary + SECOND), timeout=15)
        assert epochs == list(range(epochs[0], epochs[0] + len(epochs)))

        end = datetime.now(UTC).replace(microsecond=0)
        await eventually(lambda: all_fired_through(end), timeout=15)
        rows = await db.fetch(
            """
            SELECT split_part(idempotency_key, ':', 2) AS schedule_id, count(*) AS n,
                count(DISTINCT run_at) AS ticks, min(run_at) AS first, max(run_at) AS last
            FROM tasks WHERE run_at <= $1 GROUP BY 1
            """,
            end,
        )
        assert len(rows) == count
        for row in rows:
            span = int((row["last"] - row["first"]).total_seconds()) + 1
            # No tick twice, none missing, from each schedule's first tick to the end.
            assert row["n"] == row["ticks"] == span, dict(row)
            assert row["last"] == end
        # Every firing's key names its schedule and tick.
        named = await db.fetchval(
            """
            SELECT count(*) FROM tasks t JOIN schedules s
                ON t.idempotency_key = 'schedule:' || s.id || ':'
                    || to_char(t.run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            WHERE t.run_at <= $1
            """,
            end,
        )
        assert named == sum(row["n"] for row in rows)
    finally:
        await db.close()


async def test_a_firing_writes_the_row_a_submit_of_its_template_writes(
    db: asyncpg.Connection,
) -> None:
    """The firer's insert sends only the per-firing values and joins the templates in SQL:
    every column must come out as the shared task insert writes it from the same task,
    for several templates in one batch (numbered from 1)."""
    from conveyor.coordinator.api.validation import NewTask
    from conveyor.coordinator.ids import raw_uuid7
    from conveyor.coordinator.store import tasks
    from conveyor.coordinator.store.tasks import NEW_TASK_COLUMNS, NewRow

    now = datetime.now(UTC).replace(microsecond=0)
    full = NewTask(
        queue="q-full", type="t-full", payload=b'{"x": 1}', content_type="application/json",
        priority=7, max_attempts=9, idempotency_key=None, request_hash=b"", run_at=None,
        timeout_ms=1234, retry_initial_ms=11, retry_max_ms=22, retry_multiplier=1.5,
        retry_jitter=0.25, labels={"team": "ops", "k": "v"}, traceparent="00-" + "a" * 32
        + "-" + "b" * 16 + "-01", concurrency_key="ck", concurrency_limit=3,
        deadline=now + timedelta(hours=1),
    )  # fmt: skip
    bare = NewTask(
        queue="q-bare", type="t-bare", payload=b"", content_type="", priority=0,
        max_attempts=1, idempotency_key=None, request_hash=b"", run_at=None, timeout_ms=0,
        retry_initial_ms=0, retry_max_ms=0, retry_multiplier=2.0, retry_jitter=0.0,
        labels={}, traceparent="",
    )  # fmt: skip
    templates = [
        schedules.template_values("tenant-a", full),
        schedules.template_values("tenant-b", bare),
    ]
    ticks = [now + SECOND, now + 2 * SECOND, now + SECOND]
    keys = [f"schedule:x:{i}" for i in range(3)]
    which = [1, 1, 2]
    ids = [str(raw_uuid7()) for _ in range(3)]
    fired = await schedules.insert_firings(
        db, templates, ids, keys, [t.isoformat() for t in ticks], [str(n) for n in which], now
    )
    assert sorted(r["id"] for r in fired) == sorted(ids)

    # The same tasks through the shared insert, under other keys and ids.
    by_number = {1: ("tenant-a", full), 2: ("tenant-b", bare)}
    submitted = [
        NewRow(
            by_number[n][0],
            uuid7(),
            dataclasses.replace(by_number[n][1], idempotency_key=f"submit:{i}"),
            tasks.PENDING,
            tick,
        )
        for i, (n, tick) in enumerate(zip(which, ticks, strict=True))
    ]
    await tasks.insert(db, submitted, now)
    compared = [c for c in NEW_TASK_COLUMNS if c not in ("id", "idempotency_key")]
    query = f"SELECT {', '.join(compared)}, create_time FROM tasks WHERE id = ANY($1::uuid[])"
    for fired_id, row in zip(ids, submitted, strict=True):
        (mine,) = await db.fetch(query, [fired_id])
        (theirs,) = await db.fetch(query, [row.id])
        assert dict(mine) == dict(theirs)
    # A tick's key taken: the firing is skipped, not an error, and the rest are written.
    again = [str(raw_uuid7()) for _ in range(2)]
    tick = (now + SECOND).isoformat()
    fired = await schedules.insert_firings(
        db, templates[:1], again, [keys[0], "schedule:x:new"], [tick, tick], ["1", "1"], now
    )
    assert [r["id"] for r in fired] == [again[1]]
