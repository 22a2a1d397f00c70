"""Cluster-wide loops (issue 15): one bad row never stops a loop that serves every tenant.

Each test plants rows straight in PostgreSQL, past validation (what an operator's SQL,
an old version or a bug could leave), and shows that the loop sets each one aside (marks
it, says so once in the log and in ``conveyor_rows_set_aside_total``) while every other
tenant is served as before: the schedule firer, the promoter, the reaper and the key and
limit caches. A test of the migration shows rows stored at +-infinity before it are
repaired, and that nothing can store them since.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from testsupport import RawWorker, coordinator_config, eventually

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store.migrator import load_migrations
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    schedule_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)

pytestmark = pytest.mark.slow

ERROR = logging.ERROR


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    """The coordinator fixture (authentication off: every call is tenant ``default``)
    with metrics."""
    return {"metrics_listen": "127.0.0.1:0"}


def _set_aside(coordinator: Coordinator, loop: str) -> float:
    metrics = coordinator.telemetry.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value("conveyor_rows_set_aside_total", {"loop": loop}) or 0


def _said(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many ERROR lines of the coordinator mention ``text``."""
    return sum(1 for r in caplog.records if r.levelno >= ERROR and text in r.getMessage())


async def _count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    return int(await db.fetchval(sql, *args))


# -- the schedule firer --------------------------------------------------------------------

_TEMPLATE = schedule_pb2.TaskTemplate(type="tick").SerializeToString()
_PLANT_SCHEDULE = """
    INSERT INTO schedules (id, tenant, name, cron, time_zone, template, overlap_policy,
        catch_up_policy, catch_up_limit, next_fire_time, wake_time, create_time, update_time)
    VALUES ($1, $2, $3, $4, $5, $6, 1, 2, 100, date_trunc('second', now()),
        date_trunc('second', now()), now(), now())
"""


async def test_the_firer_sets_a_bad_schedule_aside_and_fires_the_others(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    firer = coordinator.schedule_firer
    assert firer is not None
    good = (
        await stub.CreateSchedule(
            schedule_pb2.CreateScheduleRequest(
                schedule=schedule_pb2.Schedule(
                    name="good",
                    cron="* * * * * *",
                    task_template=schedule_pb2.TaskTemplate(type="t"),
                )
            )
        )
    ).schedule
    planted = {
        # An expression, a zone, a template that does not decode, one that is no task.
        uuid.uuid4(): ("other", "cron", "not a cron", "UTC", _TEMPLATE),
        uuid.uuid4(): ("other", "zone", "* * * * * *", "Mars/Base", _TEMPLATE),
        uuid.uuid4(): ("other", "bytes", "* * * * * *", "UTC", b"\xff\xff\xff"),
        uuid.uuid4(): ("other", "untyped", "* * * * * *", "UTC", b""),
        # One of this tenant's own, to read and repair through the API.
        uuid.uuid4(): ("default", "broken", "61 * * * * *", "UTC", _TEMPLATE),
    }
    for schedule_id, (tenant, name, cron, zone, template) in planted.items():
        await db.execute(_PLANT_SCHEDULE, schedule_id, tenant, name, cron, zone, template)
    firer.wake()

    async def fired() -> int:
        return await _count(
            db, "SELECT count(*) FROM tasks WHERE idempotency_key LIKE $1", f"schedule:{good.id}:%"
        )

    before = await fired()
    await eventually(lambda: _more(fired, before + 3), timeout=10, what="the good schedule firing")
    marked = await db.fetch(
        "SELECT id, fault, wake_time FROM schedules WHERE id = ANY($1::uuid[])", list(planted)
    )
    assert all(r["fault"] and r["wake_time"] is None for r in marked), marked
    assert firer.failures == 0, firer.last_error
    assert _set_aside(coordinator, "schedule-firer") == len(planted)
    for schedule_id in planted:
        assert _said(caplog, str(schedule_id)) == 1, schedule_id
    assert await _count(db, "SELECT count(*) FROM tasks WHERE tenant = 'other'") == 0

    # The tenant sees why, and a change gives the schedule a fresh start.
    got = (await stub.GetSchedule(schedule_pb2.GetScheduleRequest(name="broken"))).schedule
    assert got.fault and not got.next_fire_times
    fixed = await stub.UpdateSchedule(
        schedule_pb2.UpdateScheduleRequest(
            schedule=schedule_pb2.Schedule(name="broken", cron="* * * * * *"),
            update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
        )
    )
    assert not fixed.schedule.fault and fixed.schedule.next_fire_times
    await eventually(
        lambda: _count(
            db, "SELECT count(*) FROM tasks WHERE idempotency_key LIKE $1", f"schedule:{got.id}:%"
        ),
        timeout=10,
        what="the repaired schedule firing",
    )


async def _more(count: object, at_least: int) -> bool:
    assert callable(count)
    return bool(await count() >= at_least)


# -- the promoter ----------------------------------------------------------------------------

_PLANT_TASK = """
    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
        max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms, retry_multiplier,
        retry_jitter, create_time, update_time, attempt, worker_id, lease_epoch,
        lease_start_time, lease_expire_time)
    VALUES ($1, $2, 'q', 't', '', 'application/json', $3, 0, 3, $4, 1000, 1000, 1000, 2, 0,
        now(), now(), $5, $6, $7, $8, $9)
"""


async def test_the_promoter_sets_an_unreachable_task_aside_and_promotes_the_others(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SCHEDULED task at run_at infinity read back as a naive datetime, and every round
    of the promoter then failed comparing it."""
    promoter = next(s for s in coordinator.services if s.name == "promoter")
    bad = uuid.uuid4()
    infinity = datetime.max  # asyncpg writes it as 'infinity'
    await db.execute(_PLANT_TASK, bad, "other", 2, infinity, 0, None, None, None, None)
    steps = promoter.steps
    await promoter.wait_until(lambda p: p.steps >= steps + 3)
    run_at = datetime.now(UTC) + timedelta(seconds=1)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(run_at)
    task = (await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="t", run_at=stamp))).task

    async def promoted() -> bool:
        state = await db.fetchval("SELECT state FROM tasks WHERE id = $1::uuid", task.id)
        return bool(state == task_pb2.TASK_STATE_PENDING)

    await eventually(promoted, timeout=5, what="the delayed task promoted")
    # On time: by the promoter's longest sleep (1 s) after its run_at, with room for load.
    assert datetime.now(UTC) - run_at < timedelta(seconds=2.5)
    row = await db.fetchrow("SELECT state, last_error FROM tasks WHERE id = $1", bad)
    assert row is not None and row["state"] == task_pb2.TASK_STATE_DEAD, row
    assert "set aside by the promoter" in row["last_error"]
    assert promoter.failures == 0, promoter.last_error
    assert _set_aside(coordinator, "promoter") == 1
    assert _said(caplog, str(bad)) == 1


# -- the reaper ------------------------------------------------------------------------------


async def test_the_reaper_sets_an_unreapable_lease_aside_and_reaps_the_others(
    coordinator: Coordinator, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired lease whose attempt cannot be recorded (no worker id, no start) failed
    the reaper's one statement, every round, for every tenant's expired leases."""
    reaper = next(s for s in coordinator.services if s.name == "reaper")
    epoch = coordinator.epoch
    expired = datetime.now(UTC) - timedelta(seconds=5)
    no_worker, no_start, good = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for task_id, tenant, worker, start in (
        (no_worker, "other", None, expired),
        (no_start, "other", "w1", None),
        (good, "default", "w2", expired),
    ):
        await db.execute(_PLANT_TASK, task_id, tenant, 3, expired, 1, worker, epoch, start, expired)

    async def reaped() -> bool:
        state = await db.fetchval("SELECT state FROM tasks WHERE id = $1", good)
        return bool(state == task_pb2.TASK_STATE_PENDING)

    await eventually(reaped, timeout=10, what="the good expired lease taken back")
    rows = await db.fetch(
        "SELECT state, last_error FROM tasks WHERE id = ANY($1::uuid[])", [no_worker, no_start]
    )
    assert all(r["state"] == task_pb2.TASK_STATE_DEAD for r in rows), rows
    assert all("set aside by the reaper" in r["last_error"] for r in rows), rows
    assert reaper.failures == 0, reaper.last_error
    assert _set_aside(coordinator, "reaper") == 2
    assert _said(caplog, str(no_worker)) == 1 and _said(caplog, str(no_start)) == 1


# -- the dispatcher --------------------------------------------------------------------------


async def test_the_dispatcher_sets_an_unsendable_task_aside_and_delivers_the_others(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    raw_workers: Callable[[], RawWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A claimed row no Assignment could carry (labels that are no string map, a
    create_time at infinity) failed the dispatcher's round after the claim had committed:
    every task claimed with it stayed leased to a worker that never got it, until the
    lease expired and an attempt was spent."""
    dispatcher = coordinator.dispatcher
    assert dispatcher is not None
    bad = [uuid.uuid4(), uuid.uuid4()]
    await db.execute(
        _PLANT_TASK.replace("now(), now(), $5", "$10, now(), $5").replace(
            "lease_expire_time)", "lease_expire_time, labels)"
        ).replace("$9)", "$9, $11::jsonb)"),
        bad[0], "default", 1, datetime.now(UTC), 0, None, None, None, None,
        datetime.now(UTC), '[1, 2]',
    )  # fmt: skip
    await db.execute(
        _PLANT_TASK.replace("now(), now(), $5", "$10, now(), $5"),
        bad[1], "default", 1, datetime.now(UTC), 0, None, None, None, None, datetime.max,
    )  # fmt: skip
    good = [
        (await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="t"))).task.id
        for _ in range(3)
    ]
    worker = raw_workers()
    await worker.connect(credits=10, types=("t",), queues=("q", "default"))
    got = await worker.assignments(3)
    assert sorted(a.lease.task_id for a in got) == sorted(good)
    assert all(a.lease.attempt == 1 for a in got)
    rows = await db.fetch("SELECT state, last_error FROM tasks WHERE id = ANY($1::uuid[])", bad)
    assert all(r["state"] == task_pb2.TASK_STATE_DEAD for r in rows), rows
    assert all("set aside by the dispatcher" in r["last_error"] for r in rows), rows
    assert dispatcher.failures == 0, dispatcher.last_error
    assert _set_aside(coordinator, "dispatcher") == 2
    assert all(_said(caplog, str(task_id)) == 1 for task_id in bad)


# -- the key and limit caches --------------------------------------------------------------


async def test_the_caches_leave_a_bad_row_out_and_load_the_others(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A submit_rate of 1e-300 written by hand made every refusal's RetryInfo infinite (the
    tenant's submits answered UNKNOWN); a key with a scope this version does not know made
    ListApiKeys answer INTERNAL for everyone."""
    directory = coordinator.directory
    assert directory is not None
    await db.execute("INSERT INTO tenants (name, submit_rate) VALUES ('default', 1e-300)")
    await db.execute("INSERT INTO tenants (name, submit_rate) VALUES ('other', 'NaN')")
    await db.execute(
        "INSERT INTO api_keys (id, secret_hash, tenant, scopes) "
        "VALUES ('aaaaaaaaaaaa', '\\x00', 'other', '{submit,root}')"
    )
    await eventually(
        lambda: (
            {"default", "other"} <= directory.limits.keys() and "aaaaaaaaaaaa" in directory.keys
        ),
        timeout=10,
        what="the planted rows loaded",
    )
    assert directory.limits["default"]["submit_rate"] is None  # the default: no limit
    for _ in range(3):
        await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="t"))
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        listed = await admin.ListApiKeys(admin_service_pb2.ListApiKeysRequest())
    assert [k.id for k in listed.keys] == ["aaaaaaaaaaaa"]
    await directory.reload_all()  # a full reload says nothing new
    assert _said(caplog, "submit_rate 1e-300") == 1 and _said(caplog, "submit_rate nan") == 1
    assert _set_aside(coordinator, "directory") == 2


# -- the migration ---------------------------------------------------------------------------


async def test_times_stored_at_infinity_are_repaired_and_cannot_be_stored_again(
    database_dsn: str,
) -> None:
    """Rows a version before the time range stored at +-infinity: the migration gives them
    the meaning they had (no bound) or sets the schedule aside; the schema then refuses
    any infinite time, however it is written."""
    conn = await asyncpg.connect(database_dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT "
                "NULL, apply_time timestamptz NOT NULL DEFAULT now())"
            )
            for migration in load_migrations()[:3]:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
        plant = _PLANT_SCHEDULE.replace("now(), now())", "now(), now()) RETURNING id")
        ids = {}
        for name in ("ends-never", "starts-always", "never"):
            ids[name] = await conn.fetchval(
                plant, uuid.uuid4(), "acme", name, "* * * * * *", "UTC", _TEMPLATE
            )
        await conn.execute("UPDATE schedules SET end_time = 'infinity' WHERE name = 'ends-never'")
        await conn.execute(
            "UPDATE schedules SET start_time = '-infinity' WHERE name = 'starts-always'"
        )
        await conn.execute("UPDATE schedules SET start_time = 'infinity' WHERE name = 'never'")
        await conn.execute(
            "INSERT INTO api_keys (id, secret_hash, tenant, scopes, expire_time) VALUES "
            "('aaaaaaaaaaaa', '\\x00', 'acme', '{submit}', 'infinity'), "
            "('bbbbbbbbbbbb', '\\x00', 'acme', '{submit}', '-infinity')"
        )
        coord = Coordinator(coordinator_config(database_dsn))
        await coord.start()
        try:
            rows = {
                r["name"]: r
                for r in await conn.fetch("SELECT name, start_time, end_time, fault FROM schedules")
            }
            assert rows["ends-never"]["end_time"] is None and rows["ends-never"]["fault"] is None
            assert rows["starts-always"]["start_time"] is None
            assert rows["never"]["fault"], rows["never"]
            keys = dict(await conn.fetch("SELECT id, expire_time FROM api_keys ORDER BY id"))
            assert keys["aaaaaaaaaaaa"] is None  # never expires, as before
            assert keys["bbbbbbbbbbbb"] is not None and keys["bbbbbbbbbbbb"] < datetime.now(UTC)
            # The repaired schedules fire; the firer never failed.
            await eventually(
                lambda: _more(
                    lambda: _count(
                        conn,
                        "SELECT count(DISTINCT s.name) FROM tasks t JOIN schedules "
                        "s ON t.idempotency_key LIKE 'schedule:' || s.id || ':%'",
                    ),
                    2,
                ),
                timeout=10,
                what="both repaired schedules firing",
            )
            assert coord.schedule_firer is not None and coord.schedule_firer.failures == 0
            for sql in (
                "UPDATE schedules SET end_time = 'infinity'",
                "UPDATE schedules SET next_fire_time = '-infinity'",
                "UPDATE api_keys SET expire_time = 'infinity'",
            ):
                with pytest.raises(asyncpg.CheckViolationError):
                    await conn.execute(sql)
        finally:
            await coord.stop(grace=1.0)
    finally:
        await conn.close()
