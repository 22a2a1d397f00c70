"""The isolation grid: two tenants x every RPC x every scope, against a coordinator process
that requires keys.

The RPCs come from the proto's service descriptors (``api_keys.required_scopes()``, which
reads the ``required_scope`` option): a new RPC fails this test until it has a row in
:data:`CROSS_TENANT`, saying what a caller of one tenant gets when it aims the call at the
other tenant's task, schedule, queue or worker. Every cell is asserted: a key without the
method's scope gets PERMISSION_DENIED naming the scope; a key with it gets NOT_FOUND for
the other tenant's things (never PERMISSION_DENIED, which would tell they exist), and
lists that hold only its own. ``admin`` is cluster-wide by design (docs/architecture.md):
its cells succeed for the other tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from security import Answer, Key, Keys, call, running, secure_coordinator, stream_answer
from testsupport import RawWorker

from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import (
    admin_service_pb2,
    auth_pb2,
    effects_service_pb2,
    schedule_pb2,
    task_pb2,
    task_service_pb2,
    task_type_service_pb2,
    watch_pb2,
    webhook_service_pb2,
    worker_service_pb2,
)

pytestmark = pytest.mark.slow

TENANTS = ("acme", "globex")
QUEUE = "shared-queue"  # the same queue and type names in both tenants
TYPE = "work"
CODE = grpc.StatusCode


@dataclass
class Things:
    """One tenant's things, made with its own keys before the grid runs."""

    tenant: str
    keys: dict[str, Key]
    pending: str = ""
    dead: str = ""
    keyed: str = ""
    """The task submitted with the idempotency key both tenants use."""
    spare_keys: list[str] = field(default_factory=list)
    lock_handle: bytes = b""
    """The handle of the lock ``held-by-<tenant>``, taken with its worker key."""
    webhook: str = ""
    """Its webhook subscription (filtered to a queue nothing uses: nothing is delivered)."""


def schedule(name: str) -> schedule_pb2.Schedule:
    return schedule_pb2.Schedule(
        name=name, cron="0 3 * * *", task_template=schedule_pb2.TaskTemplate(type=TYPE)
    )


async def make_things(channel: grpc.aio.Channel, address: str, things: Things) -> None:
    """A pending task, a dead task, a task with a shared idempotency key, two schedules
    (one named like the other tenant's) and a queue of its own."""
    keys = things.keys
    submit, read = keys["submit"].metadata, keys["read"].metadata
    tasks_ = task_service_pb2
    stub = channel.unary_unary
    submit_task = stub(
        "/conveyor.v1.TaskService/SubmitTask",
        request_serializer=tasks_.SubmitTaskRequest.SerializeToString,
        response_deserializer=tasks_.SubmitTaskResponse.FromString,
    )
    things.pending = (
        await submit_task(tasks_.SubmitTaskRequest(queue=QUEUE, type=TYPE), metadata=submit)
    ).task.id
    things.keyed = (
        await submit_task(
            tasks_.SubmitTaskRequest(queue=QUEUE, type=TYPE, idempotency_key="same-key"),
            metadata=submit,
        )
    ).task.id
    await submit_task(
        tasks_.SubmitTaskRequest(queue=f"only-{things.tenant}", type=TYPE), metadata=submit
    )
    limit = task_pb2.RateLimit(queue=f"only-{things.tenant}", type=TYPE, rate=1000)
    made = await call(
        channel,
        "/conveyor.v1.TaskService/SetRateLimit",
        tasks_.SetRateLimitRequest(limit=limit),
        keys["operate"].metadata,
    )
    assert made.code == CODE.OK, made
    for name in ("nightly", f"only-{things.tenant}"):
        create = await call(
            channel,
            "/conveyor.v1.TaskService/CreateSchedule",
            schedule_pb2.CreateScheduleRequest(schedule=schedule(name)),
            submit,
        )
        assert create.code == CODE.OK, create
    # A lock of its own, held for the whole grid.
    held = await call(
        channel,
        LOCKS + "AcquireLock",
        E.AcquireLockRequest(
            name=f"held-by-{things.tenant}", ttl=duration_pb2.Duration(seconds=600)
        ),
        keys["worker"].metadata,
    )
    assert held.code == CODE.OK and held.response.acquired, held
    things.lock_handle = held.response.handle
    operate = keys["operate"].metadata
    hook = await call(
        channel,
        WEBHOOKS + "CreateWebhook",
        W.CreateWebhookRequest(url="https://hooks.example.com/x", queues=["never-used"]),
        operate,
    )
    assert hook.code == CODE.OK, hook
    things.webhook = hook.response.webhook.id
    defined = await call(
        channel,
        TYPES + "SetTaskType",
        TT.SetTaskTypeRequest(task_type=TT.TaskType(type=f"only-{things.tenant}", priority=1)),
        operate,
    )
    assert defined.code == CODE.OK, defined
    # A dead task: a worker of the tenant fails it for good.
    dead = (
        await submit_task(
            tasks_.SubmitTaskRequest(queue="dead-q", type="doomed", max_attempts=1),
            metadata=submit,
        )
    ).task.id
    worker = RawWorker(address)
    try:
        await worker.connect(
            f"{things.tenant}-setup", queues=("dead-q",), types=("doomed",),
            metadata=keys["worker"].metadata,
        )  # fmt: skip
        (assignment,) = await worker.assignments(1)
        assert assignment.lease.task_id == dead
        ack = await worker.report(
            assignment.lease, worker_service_pb2.TASK_OUTCOME_FAILED, retryable=False
        )
        assert ack.accepted
    finally:
        await worker.close()
    things.dead = dead
    got = await call(
        channel, "/conveyor.v1.TaskService/GetTask", tasks_.GetTaskRequest(id=dead), read
    )
    assert got.response.task.state == 5  # DEAD


# -- what a call aimed at the other tenant gets, for a key with the right scope --------------

Check = Callable[[Answer, Things, Things], None]


def _ok(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer


def _not_found(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.NOT_FOUND, answer


def _own_tasks_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    ids = {t.id for t in answer.response.tasks}
    assert ids and theirs.pending not in ids and theirs.dead not in ids
    assert {t.tenant for t in answer.response.tasks} == {mine.tenant}


def _own_queues_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    names = {q.name for q in answer.response.queues}
    assert f"only-{mine.tenant}" in names and f"only-{theirs.tenant}" not in names


def _set_as_mine(answer: Answer, mine: Things, theirs: Things) -> None:
    # A limit has no tenant field: it is the caller's own, never the other tenant's.
    assert answer.code == CODE.OK and not answer.response.limit.all_tenants, answer


def _own_limits_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    queues = {limit.queue for limit in answer.response.limits}
    assert f"only-{mine.tenant}" in queues and f"only-{theirs.tenant}" not in queues


def _own_workers_only(answer: Answer, mine: Things, theirs: Things) -> None:
    # tests/integration/console/test_tenant_views.py lists workers connected at the time.
    assert answer.code == CODE.OK, answer
    assert {w.tenant for w in answer.response.workers} <= {mine.tenant}


def _own_schedules_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    names = {s.name for s in answer.response.schedules}
    assert f"only-{mine.tenant}" in names and f"only-{theirs.tenant}" not in names


def _submitted_as_mine(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    results = getattr(answer.response, "results", None) or [answer.response]
    for result in results:
        # The idempotency key the other tenant used is this tenant's own: its own task.
        assert result.task.tenant == mine.tenant and result.task.id != theirs.keyed
        assert result.task.id == mine.keyed and result.deduplicated


def _schedule_name_is_per_tenant(answer: Answer, mine: Things, theirs: Things) -> None:
    # The other tenant has a schedule of this name; it does not stop this one.
    assert answer.code == CODE.OK, answer


def _cluster_wide(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer  # admin acts for every tenant (by design)


def _their_key_created(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK and answer.response.key.tenant == theirs.tenant, answer


def _their_keys_listed(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    assert {k.tenant for k in answer.response.keys} == {theirs.tenant}


def _lock_is_per_tenant(answer: Answer, mine: Things, theirs: Things) -> None:
    # The other tenant holds a lock of this name; this tenant's is another, and free.
    assert answer.code == CODE.OK and answer.response.acquired, answer


def _their_lock_not_held(answer: Answer, mine: Things, theirs: Things) -> None:
    # Their handle does not hold this tenant's lock of the name (it does not exist).
    assert answer.code == CODE.FAILED_PRECONDITION and answer.reason == "LOCK_NOT_HELD", answer


def _their_lock_not_released(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK and not answer.response.released, answer


def _their_effect_lease(o: Things) -> Any:
    lease = worker_service_pb2.Lease(task_id=o.pending, attempt=1, epoch=1)
    return E.RecordEffectRequest(lease=lease, resume_token=b"\0" * 32, key="charge")


def _own_queue_paused(answer: Answer, mine: Things, theirs: Things) -> None:
    # The queue is named like the other tenant's (which holds a pending task), but the
    # name is per tenant: this tenant's own queue is paused, empty.
    assert answer.code == CODE.OK, answer
    queue = answer.response.queue
    assert queue.name == f"only-{theirs.tenant}" and queue.paused and queue.pending == 0


def _own_queue_resumed(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    queue = answer.response.queue
    assert queue.name == f"only-{theirs.tenant}" and not queue.paused and queue.pending == 0


def _own_dead_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    assert [t.id for t in answer.response.tasks] == [mine.dead]


def _own_dead_groups_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    assert [(g.type, g.count) for g in answer.response.groups] == [("doomed", 1)]


def _theirs_not_found(answer: Answer, mine: Things, theirs: Things) -> None:
    # A bulk call names what it did not find instead of failing: nothing of theirs.
    assert answer.code == CODE.OK, answer
    assert list(answer.response.not_found_ids) == [theirs.dead]
    assert getattr(answer.response, "retried", 0) == 0
    assert getattr(answer.response, "deleted", 0) == 0


def _no_such_worker(answer: Answer, mine: Things, theirs: Things) -> None:
    # Admin acts for every tenant; no worker of that id is connected (the set-up worker
    # left), so the answer names the worker, not a tenant boundary.
    assert answer.code == CODE.NOT_FOUND and answer.reason == "WORKER_NOT_FOUND", answer


def _own_webhooks_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    ids = {w.id for w in answer.response.webhooks}
    assert mine.webhook in ids and theirs.webhook not in ids


def _own_types_only(answer: Answer, mine: Things, theirs: Things) -> None:
    assert answer.code == CODE.OK, answer
    names = {t.type for t in answer.response.task_types}
    assert f"only-{mine.tenant}" in names and f"only-{theirs.tenant}" not in names


Request = Callable[[Things], Any]
TASKS, ADMIN = "/conveyor.v1.TaskService/", "/conveyor.v1.AdminService/"
LEDGER, LOCKS = "/conveyor.v1.LedgerService/", "/conveyor.v1.LockService/"
E = effects_service_pb2
WEBHOOKS, TYPES = "/conveyor.v1.WebhookService/", "/conveyor.v1.TaskTypeService/"
T = task_service_pb2
A = admin_service_pb2
S = schedule_pb2
W = webhook_service_pb2
TT = task_type_service_pb2

CROSS_TENANT: dict[str, tuple[Request, Check]] = {
    TASKS + "SubmitTask": (
        lambda o: T.SubmitTaskRequest(queue=QUEUE, type=TYPE, idempotency_key="same-key"),
        _submitted_as_mine,
    ),
    TASKS + "SubmitTasks": (
        lambda o: T.SubmitTasksRequest(
            tasks=[T.SubmitTaskRequest(queue=QUEUE, type=TYPE, idempotency_key="same-key")]
        ),
        _submitted_as_mine,
    ),
    TASKS + "GetTask": (lambda o: T.GetTaskRequest(id=o.pending), _not_found),
    TASKS + "ListTasks": (lambda o: T.ListTasksRequest(page_size=1000), _own_tasks_only),
    TASKS + "CancelTask": (lambda o: T.CancelTaskRequest(id=o.pending), _not_found),
    TASKS + "WatchTask": (lambda o: T.WatchTaskRequest(id=o.pending), _not_found),
    TASKS + "RetryTask": (lambda o: T.RetryTaskRequest(id=o.dead), _not_found),
    # A stream of the caller's own tenant, whatever it names (test_watch_tasks.py shows
    # that another tenant's changes never reach it).
    TASKS + "WatchTasks": (
        lambda o: watch_pb2.WatchTasksRequest(queues=[f"only-{o.tenant}"]),
        _ok,
    ),
    TASKS + "ListQueues": (lambda o: T.ListQueuesRequest(), _own_queues_only),
    TASKS + "SetRateLimit": (
        lambda o: T.SetRateLimitRequest(
            limit=task_pb2.RateLimit(queue=f"only-{o.tenant}", type=TYPE, rate=5)
        ),
        _set_as_mine,
    ),
    TASKS + "ListRateLimits": (lambda o: T.ListRateLimitsRequest(), _own_limits_only),
    TASKS + "DeleteRateLimit": (
        lambda o: T.DeleteRateLimitRequest(queue=f"only-{o.tenant}", type=TYPE),
        _not_found,
    ),
    TASKS + "ListWorkers": (lambda o: T.ListWorkersRequest(), _own_workers_only),
    TASKS + "UpdateTask": (lambda o: T.UpdateTaskRequest(id=o.pending, priority=5), _not_found),
    LEDGER + "RecordEffect": (_their_effect_lease, _not_found),
    LEDGER + "GetEffect": (lambda o: E.GetEffectRequest(task_id=o.pending, key="k"), _not_found),
    LOCKS + "AcquireLock": (
        lambda o: E.AcquireLockRequest(
            name=f"held-by-{o.tenant}", ttl=duration_pb2.Duration(seconds=1)
        ),
        _lock_is_per_tenant,
    ),
    LOCKS + "RenewLock": (
        lambda o: E.RenewLockRequest(
            name=f"held-by-{o.tenant}", handle=o.lock_handle, ttl=duration_pb2.Duration(seconds=1)
        ),
        _their_lock_not_held,
    ),
    LOCKS + "ReleaseLock": (
        lambda o: E.ReleaseLockRequest(name=f"held-by-{o.tenant}", handle=o.lock_handle),
        _their_lock_not_released,
    ),
    TASKS + "PauseQueue": (
        lambda o: T.PauseQueueRequest(queue=f"only-{o.tenant}"),
        _own_queue_paused,
    ),
    TASKS + "ResumeQueue": (
        lambda o: T.ResumeQueueRequest(queue=f"only-{o.tenant}"),
        _own_queue_resumed,
    ),
    TASKS + "ListDeadTasks": (lambda o: T.ListDeadTasksRequest(), _own_dead_only),
    TASKS + "ListDeadTaskGroups": (
        lambda o: T.ListDeadTaskGroupsRequest(),
        _own_dead_groups_only,
    ),
    TASKS + "RetryTasks": (lambda o: T.RetryTasksRequest(ids=[o.dead]), _theirs_not_found),
    TASKS + "DeleteTasks": (lambda o: T.DeleteTasksRequest(ids=[o.dead]), _theirs_not_found),
    TASKS + "CreateSchedule": (
        lambda o: S.CreateScheduleRequest(schedule=schedule(f"twin-{o.tenant}")),
        _schedule_name_is_per_tenant,
    ),
    TASKS + "GetSchedule": (lambda o: S.GetScheduleRequest(name=f"only-{o.tenant}"), _not_found),
    TASKS + "ListSchedules": (lambda o: S.ListSchedulesRequest(), _own_schedules_only),
    TASKS + "UpdateSchedule": (
        lambda o: S.UpdateScheduleRequest(
            schedule=schedule(f"only-{o.tenant}"),
            update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
        ),
        _not_found,
    ),
    TASKS + "DeleteSchedule": (
        lambda o: S.DeleteScheduleRequest(name=f"only-{o.tenant}"),
        _not_found,
    ),
    TASKS + "PauseSchedule": (
        lambda o: S.PauseScheduleRequest(name=f"only-{o.tenant}"),
        _not_found,
    ),
    TASKS + "ResumeSchedule": (
        lambda o: S.ResumeScheduleRequest(name=f"only-{o.tenant}"),
        _not_found,
    ),
    # The worker stream has its own cell runner (_connect below); no request here.
    "/conveyor.v1.WorkerService/Connect": (lambda o: None, _ok),
    ADMIN + "GetClusterStatus": (lambda o: A.GetClusterStatusRequest(), _cluster_wide),
    ADMIN + "CreateApiKey": (
        lambda o: A.CreateApiKeyRequest(tenant=o.tenant, scopes=[auth_pb2.SCOPE_READ]),
        _their_key_created,
    ),
    ADMIN + "ListApiKeys": (lambda o: A.ListApiKeysRequest(tenant=o.tenant), _their_keys_listed),
    ADMIN + "RevokeApiKey": (
        lambda o: A.RevokeApiKeyRequest(id=o.spare_keys[0]),
        _cluster_wide,
    ),
    ADMIN + "GetTenant": (lambda o: A.GetTenantRequest(name=o.tenant), _cluster_wide),
    ADMIN + "ListTenants": (lambda o: A.ListTenantsRequest(), _cluster_wide),
    ADMIN + "UpdateTenantLimits": (
        lambda o: A.UpdateTenantLimitsRequest(
            tenant=o.tenant,
            limits=auth_pb2.TenantLimits(max_schedules=1000),
            update_mask=field_mask_pb2.FieldMask(paths=["max_schedules"]),
        ),
        _cluster_wide,
    ),
    ADMIN + "ListAuditEvents": (lambda o: A.ListAuditEventsRequest(tenant=o.tenant), _cluster_wide),
    ADMIN + "DrainWorker": (
        lambda o: A.DrainWorkerRequest(worker_id=f"{o.tenant}-setup", tenant=o.tenant),
        _no_such_worker,
    ),
    WEBHOOKS + "CreateWebhook": (
        lambda o: W.CreateWebhookRequest(url="https://hooks.example.com/y", queues=["never"]),
        _ok,
    ),
    WEBHOOKS + "ListWebhooks": (lambda o: W.ListWebhooksRequest(), _own_webhooks_only),
    WEBHOOKS + "DeleteWebhook": (lambda o: W.DeleteWebhookRequest(id=o.webhook), _not_found),
    WEBHOOKS + "ListWebhookDeliveries": (
        lambda o: W.ListWebhookDeliveriesRequest(webhook_id=o.webhook),
        _not_found,
    ),
    WEBHOOKS + "ReplayWebhookDeliveries": (
        lambda o: W.ReplayWebhookDeliveriesRequest(webhook_id=o.webhook, all_failed=True),
        _not_found,
    ),
    TYPES + "SetTaskType": (
        lambda o: TT.SetTaskTypeRequest(task_type=TT.TaskType(type=f"only-{o.tenant}")),
        _ok,  # a definition of the caller's own tenant, named like the other's
    ),
    TYPES + "GetTaskType": (lambda o: TT.GetTaskTypeRequest(type=f"only-{o.tenant}"), _not_found),
    TYPES + "ListTaskTypes": (lambda o: TT.ListTaskTypesRequest(), _own_types_only),
    TYPES + "DeleteTaskType": (
        lambda o: TT.DeleteTaskTypeRequest(type=f"only-{o.tenant}"),
        _not_found,
    ),
}


async def _connect(address: str, key: Key, mine: Things, theirs: Things) -> Answer:
    """Opens a worker stream for the queue and type both tenants use: a worker key gets
    its own tenant's task, never the other's (which waits there too, and is older)."""
    worker = RawWorker(address)
    try:
        try:
            await worker.connect(
                f"{mine.tenant}-grid-{key.scopes[0]}", queues=(QUEUE,), types=(TYPE,),
                credits=1, metadata=key.metadata,
            )  # fmt: skip
        except grpc.aio.AioRpcError:
            return await stream_answer(worker.call)
        (assignment,) = await worker.assignments(1)
        assert assignment.lease.task_id in (mine.pending, mine.keyed)
        return Answer(CODE.OK)
    finally:
        await worker.close()


async def test_isolation_grid(database_dsn: str, tmp_path: Path) -> None:
    assert set(CROSS_TENANT) == set(api_keys.required_scopes()), (
        "every RPC needs a row in CROSS_TENANT: what a key of one tenant gets when it aims "
        "the call at another tenant's things"
    )
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        maker = Keys(channel, admin_key)
        things: dict[str, Things] = {}
        for tenant in TENANTS:
            keys = {s: await maker.create(tenant, s) for s in api_keys.ALL_SCOPES}
            things[tenant] = Things(tenant, keys)
            things[tenant].spare_keys = [(await maker.create(tenant, "read")).id]
            await make_things(channel, coordinator.address, things[tenant])
        cells = 0
        for mine_name, theirs_name in (TENANTS, TENANTS[::-1]):
            mine, theirs = things[mine_name], things[theirs_name]
            for method, needed in sorted(api_keys.required_scopes().items()):
                request_of, check = CROSS_TENANT[method]
                for scope, key in mine.keys.items():
                    where = f"{method} as {mine.tenant} with {scope!r}"
                    if method.endswith("/Connect"):
                        answer = await _connect(coordinator.address, key, mine, theirs)
                    else:
                        answer = await call(
                            channel,
                            method,
                            request_of(theirs),
                            key.metadata,
                            streaming=method in api_keys.streaming_methods(),
                        )
                    cells += 1
                    if scope != needed:
                        assert answer.code == CODE.PERMISSION_DENIED, (where, answer)
                        assert answer.reason == "PERMISSION_DENIED" and needed in answer.details
                        continue
                    try:
                        check(answer, mine, theirs)
                    except AssertionError as exc:
                        raise AssertionError(f"{where}: {exc}") from exc
                    if answer.code != CODE.OK:
                        assert answer.reason in (
                            "TASK_NOT_FOUND",
                            "SCHEDULE_NOT_FOUND",
                            "RATE_LIMIT_NOT_FOUND",
                            "LOCK_NOT_HELD",
                            "WORKER_NOT_FOUND",
                            "WEBHOOK_NOT_FOUND",
                            "TASK_TYPE_NOT_FOUND",
                        ), (
                            where,
                            answer,
                        )
        assert cells == 2 * len(CROSS_TENANT) * len(api_keys.ALL_SCOPES)
        # Nothing of the other tenant changed: its pending task was not cancelled, its
        # dead task is still dead, its schedules are still there.
        for tenant in TENANTS:
            read = things[tenant].keys["read"].metadata
            get = await call(
                channel, TASKS + "GetTask", T.GetTaskRequest(id=things[tenant].dead), read
            )
            assert get.response.task.state == 5
            get = await call(
                channel, TASKS + "GetTask", T.GetTaskRequest(id=things[tenant].pending), read
            )
            assert get.response.task.state != 6  # not CANCELLED
            assert get.response.task.priority != 5  # not updated
            renew = await call(
                channel,
                LOCKS + "RenewLock",
                E.RenewLockRequest(
                    name=f"held-by-{tenant}",
                    handle=things[tenant].lock_handle,
                    ttl=duration_pb2.Duration(seconds=60),
                ),
                things[tenant].keys["worker"].metadata,
            )
            assert renew.code == CODE.OK, renew  # still held: nobody else released it
            listed = await call(channel, TASKS + "ListSchedules", S.ListSchedulesRequest(), read)
            names = {s.name for s in listed.response.schedules}
            assert {"nightly", f"only-{tenant}"} <= names
