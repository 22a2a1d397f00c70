"""Queue operations against a real coordinator: pause and resume (also across a restart,
which is a new leader loading the pauses from PostgreSQL), and the dead-letter tools
(list, groups, bulk redrive, redrive of a cancelled task, delete), each checked against
what the database holds."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from tenancy import secure_coordinator
from testsupport import RawWorker, coordinator_config, error_details, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
)
from conveyor.worker import TaskContext, Worker

T = task_service_pb2
A = admin_service_pb2
FAILED = worker_service_pb2.TASK_OUTCOME_FAILED
PENDING, RUNNING, SUCCEEDED = (
    task_pb2.TASK_STATE_PENDING,
    task_pb2.TASK_STATE_RUNNING,
    task_pb2.TASK_STATE_SUCCEEDED,
)
DEAD, CANCELLED = task_pb2.TASK_STATE_DEAD, task_pb2.TASK_STATE_CANCELLED


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    return {
        "metrics_listen": "127.0.0.1:0",
        "poll_interval": 0.2,
        "retention_days": 1,
        "retention_interval": 0.1,
    }


async def _states(db: asyncpg.Connection, ids: list[str]) -> dict[str, int]:
    rows = await db.fetch("SELECT id::text, state FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return {r["id"]: r["state"] for r in rows}


@contextlib.asynccontextmanager
async def _connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _queue(stub: task_service_pb2_grpc.TaskServiceAsyncStub, name: str) -> Any:
    queues = (await stub.ListQueues(T.ListQueuesRequest())).queues
    return next((q for q in queues if q.name == name), None)


async def _sample(coordinator: Coordinator, name: str, **labels: str) -> float | None:
    registry = coordinator.telemetry.metrics.registry
    # Read from another thread, as a scrape is: a collector runs its source on the loop.
    return await asyncio.to_thread(registry.get_sample_value, name, labels)


async def _paused_gauge(coordinator: Coordinator, queue: str) -> float | None:
    return await _sample(coordinator, "conveyor_queue_paused", tenant="default", queue=queue)


async def test_pause_holds_dispatch_and_survives_a_new_leader(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    db: asyncpg.Connection,
    database_dsn: str,
) -> None:
    # A task of q runs before the pause: it must be allowed to finish.
    worker = raw_workers()
    await worker.connect("w1", credits=20, types=("work",), queues=("q", "other"))
    running = await submit(stub, "work", queue="q")
    (first,) = await worker.assignments(1)
    assert first.lease.task_id == running.id

    paused = await stub.PauseQueue(T.PauseQueueRequest(queue="q"))
    assert paused.queue.name == "q" and paused.queue.paused and paused.queue.running == 1
    again = await stub.PauseQueue(T.PauseQueueRequest(queue="q"))  # changes nothing
    assert again.queue.paused
    # Submits are accepted (none handed to the idle worker), nothing of q is dispatched;
    # a task of the other queue, submitted after them, is: the worker is served.
    held = [(await submit(stub, "work", queue="q")).id for _ in range(3)]
    held.append(
        (
            await stub.SubmitTasks(
                T.SubmitTasksRequest(tasks=[T.SubmitTaskRequest(type="work", queue="q")])
            )
        )
        .results[0]
        .task.id
    )
    other = await submit(stub, "work", queue="other")
    (got,) = await worker.assignments(1)
    assert got.lease.task_id == other.id
    # Finished, so that its lease cannot run out later (the worker closes below) and put
    # it back before the successor's own task of that queue (seen on a starved machine).
    assert (await worker.report(got.lease)).accepted
    assert set((await _states(db, held)).values()) == {PENDING}
    # The running task finishes while its queue is paused.
    ack = await worker.report(first.lease)
    assert ack.accepted
    assert (await _states(db, [running.id]))[running.id] == SUCCEEDED
    queue = await _queue(stub, "q")
    assert queue is not None and queue.paused and queue.pending == 4
    assert await _paused_gauge(coordinator, "q") == 1.0
    # A paused queue without tasks is listed too.
    await stub.PauseQueue(T.PauseQueueRequest(queue="empty"))
    empty = await _queue(stub, "empty")
    assert empty is not None and empty.paused and empty.pending == 0
    # conveyor status shows them, for every tenant.
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        status = await admin.GetClusterStatus(A.GetClusterStatusRequest())
    assert [(p.tenant, p.queue) for p in status.paused_queues] == [
        ("default", "empty"),
        ("default", "q"),
    ]

    # A new leader on the same database loads the pause (PostgreSQL holds it).
    await worker.close()
    await coordinator.stop(grace=0.5)
    successor = Coordinator(
        coordinator_config(database_dsn, metrics_listen="127.0.0.1:0", poll_interval=0.2)
    )
    await successor.start()
    try:
        async with grpc.aio.insecure_channel(successor.address) as channel:
            stub2 = task_service_pb2_grpc.TaskServiceStub(channel)
            await eventually(successor.office.is_leader, what="the successor to lead")
            worker2 = RawWorker(successor.address)
            try:
                await worker2.connect("w2", credits=20, types=("work",), queues=("q", "other"))
                other2 = await submit(stub2, "work", queue="other")
                (got,) = await worker2.assignments(1)
                assert got.lease.task_id == other2.id  # served; q still held
                assert set((await _states(db, held)).values()) == {PENDING}
                queue = await _queue(stub2, "q")
                assert queue is not None and queue.paused
                assert await _paused_gauge(successor, "q") == 1.0

                resumed = await stub2.ResumeQueue(T.ResumeQueueRequest(queue="q"))
                assert not resumed.queue.paused
                got_ids = {a.lease.task_id for a in await worker2.assignments(len(held))}
                assert got_ids == set(held)
                assert await _paused_gauge(successor, "q") is None
                await stub2.ResumeQueue(T.ResumeQueueRequest(queue="q"))  # changes nothing
            finally:
                await worker2.close()
    finally:
        await successor.stop(grace=0.5)


async def _fail_all(worker: RawWorker, count: int, errors: dict[str, str]) -> list[str]:
    """Fails ``count`` assignments for good, each with the error its type maps to."""
    ids: list[str] = []
    for assignment in await worker.assignments(count):
        ack = await worker.report(
            assignment.lease, FAILED, error=errors[assignment.type], retryable=False
        )
        assert ack.accepted
        ids.append(assignment.lease.task_id)
    return ids


async def test_dead_letter_tools(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    db: asyncpg.Connection,
) -> None:
    errors = {
        "mail": "ValueError: bad address\nTraceback (most recent call last): ...",
        "sms": "KeyError: 'provider'",
    }
    worker = raw_workers()
    await worker.connect("dlq", credits=50, types=("mail", "sms"), queues=("dq",))
    for _ in range(3):
        await submit(stub, "mail", queue="dq", max_attempts=1)
    await submit(stub, "sms", queue="dq", max_attempts=1)
    dead = await _fail_all(worker, 4, errors)
    assert set((await _states(db, dead)).values()) == {DEAD}
    await worker.close()

    groups = (await stub.ListDeadTaskGroups(T.ListDeadTaskGroupsRequest())).groups
    assert [(g.type, g.fingerprint, g.count, list(g.queues)) for g in groups] == [
        ("mail", "ValueError: bad address", 3, ["dq"]),
        ("sms", "KeyError: 'provider'", 1, ["dq"]),
    ]
    assert groups[0].first_seen.ToDatetime() <= groups[0].last_seen.ToDatetime()
    mail = T.DeadTaskFilter(type="mail", fingerprint="ValueError: bad address")
    listed = await stub.ListDeadTasks(T.ListDeadTasksRequest(filter=mail, page_size=2))
    assert len(listed.tasks) == 2 and listed.next_page_token
    rest = await stub.ListDeadTasks(
        T.ListDeadTasksRequest(filter=mail, page_size=2, page_token=listed.next_page_token)
    )
    mail_ids = {t.id for t in [*listed.tasks, *rest.tasks]}
    assert len(mail_ids) == 3 and not rest.next_page_token
    none = await stub.ListDeadTasks(T.ListDeadTasksRequest(filter=T.DeadTaskFilter(queue="nope")))
    assert not none.tasks

    # Bulk redrive by filter: the three mail tasks; again: nothing more (idempotent).
    retried = await stub.RetryTasks(T.RetryTasksRequest(filter=mail))
    assert retried.retried == 3 and not retried.more
    states = await _states(db, list(mail_ids))
    assert set(states.values()) == {PENDING}
    again = await stub.RetryTasks(T.RetryTasksRequest(filter=mail))
    assert again.retried == 0
    # A max_tasks smaller than the match says there is more.
    (sms_id,) = set(dead) - mail_ids
    cancelled = (await submit(stub, "sms", queue="dq")).id
    await stub.CancelTask(T.CancelTaskRequest(id=cancelled))
    both = T.DeadTaskFilter(queue="dq", states=[DEAD, CANCELLED])
    part = await stub.RetryTasks(T.RetryTasksRequest(filter=both, max_tasks=1))
    assert part.retried == 1 and part.more

    # By ids: a redriven (pending) task is skipped, an unknown id not found; a cancelled
    # task is redriven (issue 20, break 6).
    missing = str(uuid.uuid4())
    cancelled2 = (await submit(stub, "sms", queue="dq", max_attempts=2)).id
    await stub.CancelTask(T.CancelTaskRequest(id=cancelled2))
    by_ids = await stub.RetryTasks(
        T.RetryTasksRequest(ids=[cancelled2, next(iter(mail_ids)), missing])
    )
    assert by_ids.retried == 1
    assert list(by_ids.skipped_ids) == [next(iter(mail_ids))]
    assert list(by_ids.not_found_ids) == [missing]
    row = await db.fetchrow(
        "SELECT state, attempt_base, attempt FROM tasks WHERE id = $1", cancelled2
    )
    assert row["state"] == PENDING and row["attempt_base"] == row["attempt"]

    # Delete: by ids only finished tasks go (with their attempts); by filter too.
    left = [t for t in [sms_id, cancelled] if (await _states(db, [t]))[t] in (DEAD, CANCELLED)]
    assert left  # the one max_tasks=1 left
    deleted = await stub.DeleteTasks(T.DeleteTasksRequest(ids=[*left, cancelled2, missing]))
    assert deleted.deleted == len(left)
    assert list(deleted.skipped_ids) == [cancelled2] and list(deleted.not_found_ids) == [missing]
    assert await _states(db, left) == {}
    assert (
        await db.fetchval(
            "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1::uuid[])", left
        )
        == 0
    )
    # A succeeded task is purged by a filter naming SUCCEEDED.
    done = await submit(stub, "tick", queue="done-q")
    await db.execute(
        "UPDATE tasks SET state = $2, finish_time = now() WHERE id = $1", done.id, SUCCEEDED
    )
    purge = await stub.DeleteTasks(
        T.DeleteTasksRequest(filter=T.DeadTaskFilter(queue="done-q", states=[SUCCEEDED]))
    )
    assert purge.deleted == 1 and await _states(db, [done.id]) == {}
    purged = await _sample(
        coordinator, "conveyor_tasks_purged_total", tenant="default", reason="purge"
    )
    assert purged == len(left) + 1


def _uuid7_at(when: datetime) -> str:
    """A UUIDv7 of ``when`` (random bits after the time), as a task made then has."""
    value = (int(when.timestamp() * 1000) << 80) | (0x7 << 76) | (0b10 << 62)
    return str(uuid.UUID(int=value | (uuid.uuid4().int & ((1 << 62) - 1))))


async def test_retention_deletes_old_finished_tasks_only(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
) -> None:
    """retention_days=1 (this module's coordinator): finished 3 days ago goes; finished
    recently (even if made long ago), or unfinished, stays."""
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    cases = {"old-done": (SUCCEEDED, old), "old-dead": (DEAD, old), "recent": (SUCCEEDED, now),
             "old-pending": (PENDING, None), "made-old-done-now": (SUCCEEDED, now)}  # fmt: skip
    ids: dict[str, str] = {}
    for name, (state, finished) in cases.items():
        task = await submit(stub, "echo", queue="retention")
        new_id = task.id if name == "recent" else _uuid7_at(old - timedelta(hours=1))
        await db.execute(
            "UPDATE tasks SET id = $2, state = $3, finish_time = $4 WHERE id = $1",
            task.id, new_id, state, finished,
        )  # fmt: skip
        ids[name] = new_id
    gone = {ids["old-done"], ids["old-dead"]}
    kept = set(ids.values()) - gone

    async def swept() -> bool:
        return set(await _states(db, list(ids.values()))) == kept

    await eventually(swept, what="the retention sweep")

    # The sweep may have taken the two in two rounds (one ran between the UPDATEs above),
    # and a round counts after its commit: the count can trail what the table shows.
    async def purged() -> bool:
        sample = await _sample(
            coordinator, "conveyor_tasks_purged_total", tenant="default", reason="retention"
        )
        assert sample is None or sample <= 2, sample
        return sample == 2

    await eventually(purged, what="both deletions counted")


async def test_single_retry_redrives_a_cancelled_task(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, db: asyncpg.Connection
) -> None:
    """Issue 20, break 6: `conveyor retry` of a cancelled task was FAILED_PRECONDITION."""
    task = await submit(stub, "echo", queue="c")
    await stub.CancelTask(T.CancelTaskRequest(id=task.id))
    retried = (await stub.RetryTask(T.RetryTaskRequest(id=task.id))).task
    assert retried.state == PENDING
    assert (await _states(db, [task.id]))[task.id] == PENDING
    with pytest.raises(grpc.aio.AioRpcError) as pending:
        await stub.RetryTask(T.RetryTaskRequest(id=task.id))
    assert pending.value.code() == grpc.StatusCode.FAILED_PRECONDITION


BAD_BULK: list[tuple[Any, str]] = [
    (T.RetryTasksRequest(), "ids"),
    (T.RetryTasksRequest(ids=[str(uuid.uuid4())], filter=T.DeadTaskFilter()), "ids"),
    (T.RetryTasksRequest(ids=["nope"]), "ids[0]"),
    (T.RetryTasksRequest(filter=T.DeadTaskFilter(states=[SUCCEEDED])), "filter.states"),
    (T.RetryTasksRequest(filter=T.DeadTaskFilter(queue="bad queue")), "filter.queue"),
    (T.RetryTasksRequest(filter=T.DeadTaskFilter(), max_tasks=-1), "max_tasks"),
    (T.DeleteTasksRequest(filter=T.DeadTaskFilter(states=[PENDING])), "filter.states"),
    (T.ListDeadTasksRequest(filter=T.DeadTaskFilter(type="x\n")), "filter.type"),
]


async def test_queue_calls_refuse_bad_input(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    calls = {
        T.RetryTasksRequest: stub.RetryTasks,
        T.DeleteTasksRequest: stub.DeleteTasks,
        T.ListDeadTasksRequest: stub.ListDeadTasks,
    }
    for request, field in BAD_BULK:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await calls[type(request)](request)  # type: ignore[operator]
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, bad.value)
        assert field in error_details(bad.value).fields, (request, bad.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.PauseQueue(T.PauseQueueRequest(queue=""))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(bad.value).fields == ["queue"]


async def test_operator_drain(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Callable[[], RawWorker],
    db: asyncpg.Connection,
) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        # A raw worker: told to drain, given nothing more; its running task finishes.
        worker = raw_workers()
        await worker.connect("to-drain", credits=10, types=("work",), queues=("dr",))
        held = await submit(stub, "work", queue="dr")
        (assignment,) = await worker.assignments(1)
        # Renewed while the test goes on: expired (2 s leases on a loaded machine), it was
        # assigned again to the other worker below, which then got two tasks.
        worker.hold(assignment.lease)
        reply = await admin.DrainWorker(
            A.DrainWorkerRequest(worker_id="to-drain", reason="kernel upgrade")
        )
        assert reply.worker.draining and reply.worker.in_flight == 1
        assert reply.worker.tenant == "default"
        told = await worker.receive_kind("drain")
        assert told.reason == "kernel upgrade"
        later = await submit(stub, "work", queue="dr")
        other = raw_workers()
        await other.connect("other", credits=10, types=("work",), queues=("dr",))
        (got,) = await other.assignments(1)
        assert got.lease.task_id == later.id  # not the drained worker's, though it had credit
        assert (await worker.report(assignment.lease)).accepted
        assert (await _states(db, [held.id]))[held.id] == SUCCEEDED
        await other.close()

        # A worker of the SDK drains and exits: its run() returns.
        sdk = Worker(coordinator.address, worker_id="sdk-drained", queues="sdk", grace_period=5)

        @sdk.task("echo")
        async def echo(ctx: TaskContext, payload: Any) -> Any:
            return payload

        run = asyncio.create_task(sdk.run(install_signal_handlers=False))
        try:
            async with asyncio.timeout(10):
                await sdk.wait_connected()
            await admin.DrainWorker(A.DrainWorkerRequest(worker_id="sdk-drained"))
            async with asyncio.timeout(10):
                await run
        finally:
            sdk.shutdown(force=True)
            with contextlib.suppress(BaseException):
                await run

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await admin.DrainWorker(A.DrainWorkerRequest(worker_id="nobody"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(missing.value).reason == "WORKER_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.DrainWorker(A.DrainWorkerRequest())
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(bad.value).fields == ["worker_id"]


async def test_one_tenant_cannot_pause_redrive_or_purge_anothers(database_dsn: str) -> None:
    """With keys: acme's pause of a queue named like globex's, and its redrive and purge
    by filter (which match every tenant's rows but for the tenant), leave globex's alone.
    (The isolation grid aims each call at the other tenant's ids.)"""
    async with (
        secure_coordinator(database_dsn, poll_interval=0.2) as secure,
        _connect(database_dsn) as db,
    ):
        acme, globex = await secure.tenant("acme"), await secure.tenant("globex")
        globex_worker = await secure.tenant("globex", "worker")
        tasks = secure.tasks

        async def dead(key: Any) -> str:
            task = await tasks.SubmitTask(
                T.SubmitTaskRequest(type="x", queue="shared"), metadata=key.metadata
            )
            await db.execute(
                "UPDATE tasks SET state = $2, finish_time = now() WHERE id = $1",
                task.task.id,
                DEAD,
            )
            return task.task.id

        mine, theirs = await dead(acme), await dead(globex)
        await tasks.PauseQueue(T.PauseQueueRequest(queue="shared"), metadata=acme.metadata)
        all_dead = T.DeadTaskFilter(states=[DEAD, CANCELLED])
        retried = await tasks.RetryTasks(
            T.RetryTasksRequest(filter=all_dead), metadata=acme.metadata
        )
        assert retried.retried == 1
        assert (await _states(db, [mine, theirs])) == {mine: PENDING, theirs: DEAD}
        await tasks.CancelTask(T.CancelTaskRequest(id=mine), metadata=acme.metadata)
        purged = await tasks.DeleteTasks(
            T.DeleteTasksRequest(filter=all_dead), metadata=acme.metadata
        )
        assert purged.deleted == 1
        assert (await _states(db, [mine, theirs])) == {theirs: DEAD}
        # globex's queue "shared" is not paused: its worker is served.
        listed = await tasks.ListQueues(T.ListQueuesRequest(), metadata=globex.metadata)
        assert not any(q.paused for q in listed.queues)
        task = await tasks.SubmitTask(
            T.SubmitTaskRequest(type="x", queue="shared"), metadata=globex.metadata
        )
        worker = RawWorker(secure.coordinator.address)
        try:
            await worker.connect(
                "g", types=("x",), queues=("shared",), metadata=globex_worker.metadata
            )
            (got,) = await worker.assignments(1)
            assert got.lease.task_id == task.task.id
        finally:
            await worker.close()
