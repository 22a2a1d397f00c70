"""Edge values (issue 15): every timestamp, duration and number a caller sends has one range
that every layer holds (coordinator/bounds.py). A value at the edge of its type is refused
with INVALID_ARGUMENT naming the field, never stored to break what reads it later: not
the firer that serves every tenant, not the tenant's own lists, not the key listing."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from security import Key
from tenancy import Secure, secure_coordinator
from testsupport import ErrorDetails, error_details, eventually

from conveyor.coordinator import bounds
from conveyor.v1 import admin_service_pb2, auth_pb2, schedule_pb2, task_service_pb2

pytestmark = pytest.mark.slow

# The largest and the smallest protobuf Timestamp (asyncpg stores them as +-infinity).
LARGEST = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
SMALLEST = timestamp_pb2.Timestamp(seconds=-62_135_596_800)
YEAR_9999 = timestamp_pb2.Timestamp(seconds=253_402_300_799 - 5 * 3600)


async def _refused(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return error_details(caught.value)


def _schedule(name: str, **fields: Any) -> schedule_pb2.CreateScheduleRequest:
    return schedule_pb2.CreateScheduleRequest(
        schedule=schedule_pb2.Schedule(
            name=name,
            cron="* * * * * *",
            task_template=schedule_pb2.TaskTemplate(type="tick"),
            **fields,
        )
    )


async def _fired(db: asyncpg.Connection, tenant: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks WHERE tenant = $1", tenant))


async def test_edge_timestamps_are_refused_and_every_tenants_schedules_keep_firing(
    database_dsn: str,
) -> None:
    """A submit key's CreateSchedule with end_time at the largest Timestamp was stored as
    infinity and stopped the firer for every tenant; start_time at the smallest broke the
    tenant's own lists; a start in year 9999 in a zone east of UTC overflowed croniter
    after the commit."""
    async with secure_coordinator(database_dsn) as secure:
        attacker = await secure.tenant("acme")
        victim = await secure.tenant("globex")
        await secure.tasks.CreateSchedule(_schedule("heartbeat"), metadata=victim.metadata)
        db = await asyncpg.connect(database_dsn)
        try:
            await eventually(lambda: _fired(db, "globex"), timeout=10, what="a first firing")
            for field, value, zone in (
                ("end_time", LARGEST, ""),
                ("start_time", SMALLEST, ""),
                ("start_time", YEAR_9999, "Asia/Tokyo"),
                ("end_time", timestamp_pb2.Timestamp(seconds=-1), ""),
            ):
                request = _schedule("edge", time_zone=zone, **{field: value})
                details = await _refused(
                    secure.tasks.CreateSchedule(request, metadata=attacker.metadata)
                )
                assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (field, details)
                assert details.fields == [f"schedule.{field}"], details
            assert await db.fetchval("SELECT count(*) FROM schedules WHERE tenant = 'acme'") == 0
            # The attacker's own schedules work as before.
            await _use_schedules(secure, attacker)
            # Every tenant's schedules keep firing: three more ticks of the victim's.
            before = await _fired(db, "globex")
            await eventually(
                lambda: _more(db, "globex", before + 3), timeout=10, what="three more firings"
            )
            firer = secure.coordinator.schedule_firer
            assert firer is not None
            assert firer.failures == 0, firer.last_error
        finally:
            await db.close()


async def _more(db: asyncpg.Connection, tenant: str, count: int) -> bool:
    return await _fired(db, tenant) >= count


async def _use_schedules(secure: Secure, key: Key) -> None:
    far = datetime(8999, 12, 31, tzinfo=UTC)
    edge = timestamp_pb2.Timestamp()
    edge.FromDatetime(bounds.TIME_MAX)
    created = await secure.tasks.CreateSchedule(
        _schedule("mine", time_zone="Asia/Tokyo", end_time=edge), metadata=key.metadata
    )
    assert created.schedule.next_fire_times
    late = timestamp_pb2.Timestamp()
    late.FromDatetime(far)
    later = await secure.tasks.CreateSchedule(
        _schedule("later", time_zone="Pacific/Kiritimati", start_time=late), metadata=key.metadata
    )
    assert later.schedule.next_fire_times[0].ToDatetime(tzinfo=UTC) >= far
    listed = await secure.tasks.ListSchedules(
        schedule_pb2.ListSchedulesRequest(), metadata=key.metadata
    )
    assert [s.name for s in listed.schedules] == ["later", "mine"]
    await secure.tasks.PauseSchedule(
        schedule_pb2.PauseScheduleRequest(name="mine"), metadata=key.metadata
    )
    resumed = await secure.tasks.ResumeSchedule(
        schedule_pb2.ResumeScheduleRequest(name="mine"), metadata=key.metadata
    )
    assert resumed.schedule.next_fire_times


async def test_an_api_key_expiring_at_the_largest_timestamp_is_refused(database_dsn: str) -> None:
    """CreateApiKey with the largest expire_time answered INTERNAL but created the key,
    and ListApiKeys then failed for that tenant and for the all-tenants listing."""
    async with secure_coordinator(database_dsn) as secure:
        await secure.tenant("acme")
        for value in (LARGEST, YEAR_9999, SMALLEST):
            request = admin_service_pb2.CreateApiKeyRequest(
                tenant="acme", scopes=[auth_pb2.SCOPE_SUBMIT], expire_time=value
            )
            details = await _refused(
                secure.admin.CreateApiKey(request, metadata=secure.admin_metadata)
            )
            assert (details.code, details.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                ["expire_time"],
            ), details
        for tenant in ("acme", ""):
            listed = await secure.admin.ListApiKeys(
                admin_service_pb2.ListApiKeysRequest(tenant=tenant, show_inactive=True),
                metadata=secure.admin_metadata,
            )
            assert all(not k.HasField("expire_time") for k in listed.keys)
            assert len(listed.keys) == (1 if tenant else 2)


@pytest.mark.parametrize(
    ("limit", "value"),
    [
        ("submit_rate", 1e-300),
        ("submit_rate", 5e-324),
        ("submit_rate", 1e-12),
        ("submit_rate", float("nan")),
        ("submit_rate", float("inf")),
        ("submit_rate", -1.0),
        ("max_backlog", -1),
        ("max_backlog", 2**63 - 1),
        ("submit_burst", 2**63 - 1),
        ("max_schedules", -(2**63)),
        ("dispatch_weight", 0),
        ("dispatch_weight", 6),
        ("dispatch_weight", -1),
    ],
)
async def test_every_tenant_limit_has_a_range(database_dsn: str, limit: str, value: float) -> None:
    """UpdateTenantLimits took submit_rate=1e-300; the refusals' retry_after was infinite,
    and every submit of the tenant answered UNKNOWN (OverflowError)."""
    async with secure_coordinator(database_dsn) as secure:
        request = admin_service_pb2.UpdateTenantLimitsRequest(
            tenant="acme",
            limits=auth_pb2.TenantLimits(**{limit: value}),  # type: ignore[arg-type]
        )
        details = await _refused(
            secure.admin.UpdateTenantLimits(request, metadata=secure.admin_metadata)
        )
        assert (details.code, details.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            [f"limits.{limit}"],
        ), details


async def test_the_slowest_rate_refuses_with_a_retry_info_within_the_ceiling(
    database_dsn: str,
) -> None:
    async with secure_coordinator(database_dsn) as secure:
        acme = await secure.tenant("acme")
        await secure.admin.UpdateTenantLimits(
            admin_service_pb2.UpdateTenantLimitsRequest(
                tenant="acme",
                limits=auth_pb2.TenantLimits(submit_rate=bounds.RATE_MIN, submit_burst=1),
            ),
            metadata=secure.admin_metadata,
        )
        submit = task_service_pb2.SubmitTaskRequest(type="t")
        await secure.tasks.SubmitTask(submit, metadata=acme.metadata)
        details = await _refused(secure.tasks.SubmitTask(submit, metadata=acme.metadata))
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        # A token takes 1000 s to come: the RetryInfo says the ceiling, not 1000 s.
        assert details.retry_after == bounds.RETRY_AFTER_MAX
        assert details.quota_subjects == ["submit_rate"]
