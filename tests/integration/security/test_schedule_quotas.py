"""A schedule's firing is a submit (issue 15): it counts against the tenant's max_backlog
and submit_rate. A tick the limits refuse submits nothing and is recorded: among the
schedule's recent firings (with the limit) and in the metrics. Before, one per-second
schedule reached 10 pending tasks in 10 s with max_backlog=3 while the tenant's own
submits were refused."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import asyncpg
import grpc
import pytest
from security import Key
from tenancy import Secure, secure_coordinator
from testsupport import error_details, eventually

from conveyor.v1 import admin_service_pb2, auth_pb2, schedule_pb2, task_pb2, task_service_pb2

pytestmark = pytest.mark.slow

UNFINISHED = (task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_SCHEDULED)


async def _limit(secure: Secure, tenant: str, **limits: Any) -> None:
    await secure.admin.UpdateTenantLimits(
        admin_service_pb2.UpdateTenantLimitsRequest(
            tenant=tenant, limits=auth_pb2.TenantLimits(**limits)
        ),
        metadata=secure.admin_metadata,
    )


async def _every_second(secure: Secure, key: Key, name: str) -> schedule_pb2.Schedule:
    request = schedule_pb2.CreateScheduleRequest(
        schedule=schedule_pb2.Schedule(
            name=name, cron="* * * * * *", task_template=schedule_pb2.TaskTemplate(type="t")
        )
    )
    return (await secure.tasks.CreateSchedule(request, metadata=key.metadata)).schedule


async def _count(db: asyncpg.Connection, tenant: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM tasks WHERE tenant = $1 AND state = ANY($2::smallint[])",
            tenant,
            list(UNFINISHED),
        )
    )


async def _refusal(call: Awaitable[Any]) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert details.reason == "QUOTA_EXCEEDED", details
    return details.quota_subjects


def _refused_ticks(secure: Secure, tenant: str, limit: str) -> float:
    metrics = secure.coordinator.telemetry.metrics
    assert metrics is not None
    value = metrics.registry.get_sample_value(
        "conveyor_schedule_ticks_refused_total", {"tenant": tenant, "limit": limit}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("limits", "refused_by", "at_most"),
    [
        ({"max_backlog": 3}, "max_backlog", 3),
        ({"submit_rate": 0.01, "submit_burst": 1}, "submit_rate", 1),
    ],
)
async def test_a_firing_counts_against_the_tenants_limits(
    database_dsn: str, limits: dict[str, Any], refused_by: str, at_most: int
) -> None:
    async with secure_coordinator(database_dsn, metrics_listen="127.0.0.1:0") as secure:
        acme = await secure.tenant("acme")
        globex = await secure.tenant("globex")
        await _limit(secure, "acme", max_schedules=1, **limits)
        db = await asyncpg.connect(database_dsn)
        try:
            await _every_second(secure, acme, "every-second")
            clock = await _every_second(secure, globex, "clock")  # another tenant's, unlimited

            async def ticks() -> int:
                return int(
                    await db.fetchval(
                        "SELECT count(*) FROM tasks WHERE idempotency_key LIKE $1",
                        f"schedule:{clock.id}:%",
                    )
                )

            # Six ticks pass: the other tenant's schedule fires each, acme's at most its
            # limit's worth.
            await eventually(lambda: _at_least(ticks, 6), timeout=15, what="six ticks")
            assert await _count(db, "acme") <= at_most
            got = await secure.tasks.GetSchedule(
                schedule_pb2.GetScheduleRequest(name="every-second"), metadata=acme.metadata
            )
            firings = list(got.schedule.recent_firings)
            refused = [f for f in firings if f.refused_limit]
            assert len(refused) >= 6 - at_most - 1, firings
            assert {f.refused_limit for f in refused} == {refused_by}
            assert all(not f.task_id and f.task_state == 0 for f in refused)
            assert [f.tick_time.ToDatetime() for f in firings] == sorted(
                (f.tick_time.ToDatetime() for f in firings), reverse=True
            )
            assert _refused_ticks(secure, "acme", refused_by) >= len(refused)
            # The tenant's own submits meet the same limit.
            subjects = await _refusal(
                secure.tasks.SubmitTask(
                    task_service_pb2.SubmitTaskRequest(type="t"), metadata=acme.metadata
                )
            )
            assert subjects == [refused_by]
            # Below the limit again (its tasks cancelled, the limit lifted): it fires.
            await _limit(secure, "acme", max_backlog=0, submit_rate=0)
            fired = await _count(db, "acme")
            await eventually(
                lambda: _more_than(db, "acme", fired), timeout=10, what="acme firing again"
            )
        finally:
            await db.close()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def _more_than(db: asyncpg.Connection, tenant: str, n: int) -> bool:
    return await _count(db, tenant) > n
