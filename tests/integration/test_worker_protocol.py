"""The worker stream, driven message by message: credit, leases, results, retries, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from testsupport import TEST_LEASE, RawWorker, eventually, submit

from conveyor.v1 import (
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

Stub = task_service_pb2_grpc.TaskServiceStub
Workers = Callable[[], RawWorker]
FAILED = worker_service_pb2.TASK_OUTCOME_FAILED


async def _state(db: asyncpg.Connection, task_id: str) -> int:
    return int(await db.fetchval("SELECT state FROM tasks WHERE id = $1::uuid", task_id))


async def test_assignments_never_exceed_credit(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    worker = raw_workers()
    await worker.connect(credits=3)
    for _ in range(10):
        await submit(stub)
    got = await worker.assignments(3)
    assert len(got) == 3
    # Another submit wakes the dispatcher again; the worker still has no credit.
    await submit(stub)
    await worker.send(credit=worker_service_pb2.Credit(credits=2))
    got += await worker.assignments(2)
    running = await db.fetchval("SELECT count(*) FROM tasks WHERE state = 3")
    assert running == 5
    assert len({a.lease.task_id for a in got}) == 5


async def test_priority_then_age_decides_the_order(stub: Stub, raw_workers: Workers) -> None:
    low = await submit(stub, priority=-5)
    first_default = await submit(stub)
    high = await submit(stub, priority=10)
    second_default = await submit(stub)
    worker = raw_workers()
    await worker.connect(credits=4)
    got = await worker.assignments(4)
    assert [a.lease.task_id for a in got] == [high.id, first_default.id, second_default.id, low.id]


async def test_success_is_recorded_with_the_attempt(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    task = await submit(stub, payload=b'"hi"')
    worker = raw_workers()
    await worker.connect("w-ok")
    (assignment,) = await worker.assignments(1)
    assert assignment.payload == b'"hi"' and assignment.lease.attempt == 1
    ack = await worker.report(assignment.lease, result=b'"done"')
    assert ack.accepted
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert got.task.result == b'"done"'
    (attempt,) = got.attempts
    assert attempt.worker_id == "w-ok"
    assert attempt.outcome == task_pb2.ATTEMPT_OUTCOME_SUCCEEDED
    assert attempt.end_time.ToDatetime() >= attempt.start_time.ToDatetime()


async def test_result_for_a_task_not_held_is_refused_and_recorded(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    task = await submit(stub)
    honest, rogue = raw_workers(), raw_workers()
    await honest.connect("honest", credits=1)
    (assignment,) = await honest.assignments(1)
    await rogue.connect("rogue", credits=0)
    forged = await rogue.report(assignment.lease, result=b'"forged"')
    assert not forged.accepted
    garbage = await rogue.report(worker_service_pb2.Lease(task_id="garbage", attempt=1, epoch=1))
    assert not garbage.accepted
    assert (await honest.report(assignment.lease, result=b'"real"')).accepted
    row = await db.fetchrow("SELECT state, result FROM tasks WHERE id = $1::uuid", task.id)
    assert (row["state"], row["result"]) == (task_pb2.TASK_STATE_SUCCEEDED, b'"real"')
    refused = await db.fetchval("SELECT count(*) FROM refused_results WHERE worker_id = 'rogue'")
    assert refused == 1


async def test_expired_lease_goes_back_and_the_stale_result_is_refused(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    task = await submit(stub)
    silent = raw_workers()
    await silent.connect("silent", credits=1)
    (first,) = await silent.assignments(1)
    # No heartbeats: the reaper takes the lease back after it expires.
    await eventually(lambda: _is(db, task.id, task_pb2.TASK_STATE_PENDING), timeout=TEST_LEASE * 5)
    other = raw_workers()
    await other.connect("other", credits=1)
    (second,) = await other.assignments(1)
    assert second.lease.attempt == 2
    assert not (await silent.report(first.lease, result=b'"stale"')).accepted
    assert (await other.report(second.lease, result=b'"fresh"')).accepted
    row = await db.fetchrow("SELECT state, result FROM tasks WHERE id = $1::uuid", task.id)
    assert (row["state"], row["result"]) == (task_pb2.TASK_STATE_SUCCEEDED, b'"fresh"')
    outcomes = await db.fetch("SELECT attempt, outcome FROM task_attempts ORDER BY attempt")
    assert [(r["attempt"], r["outcome"]) for r in outcomes] == [
        (1, task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED),
        (2, task_pb2.ATTEMPT_OUTCOME_SUCCEEDED),
    ]


async def _is(db: asyncpg.Connection, task_id: str, state: int) -> bool:
    return await _state(db, task_id) == state


async def test_heartbeats_keep_the_lease(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    task = await submit(stub)
    worker = raw_workers()
    await worker.connect("beating", credits=1)
    (assignment,) = await worker.assignments(1)
    loop = asyncio.get_running_loop()
    until = loop.time() + TEST_LEASE * 2.5
    while loop.time() < until:
        await worker.send(heartbeat=worker_service_pb2.Heartbeat(leases=[assignment.lease]))
        ack = await worker.receive_kind("heartbeat_ack")
        assert list(ack.lost) == []
        assert await _state(db, task.id) == task_pb2.TASK_STATE_RUNNING
        await asyncio.sleep(TEST_LEASE / 4)
    assert (await worker.report(assignment.lease)).accepted


async def test_reconnect_keeps_in_flight_and_releases_the_rest(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    kept, lost = await submit(stub), await submit(stub)
    first = raw_workers()
    await first.connect("phoenix", credits=2)
    assignments = {a.lease.task_id: a for a in await first.assignments(2)}
    await first.close()
    second = raw_workers()
    welcome = await second.connect("phoenix", credits=0, in_flight=(assignments[kept.id].lease,))
    assert list(welcome.lost) == []
    # The lease the worker did not list is taken back at once, not at lease expiry.
    assert await _state(db, lost.id) == task_pb2.TASK_STATE_PENDING
    assert await _state(db, kept.id) == task_pb2.TASK_STATE_RUNNING
    assert (await second.report(assignments[kept.id].lease)).accepted


async def test_retryable_failure_backs_off_then_dies(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    policy = task_pb2.RetryPolicy(
        initial_backoff=duration_pb2.Duration(nanos=200_000_000), multiplier=1.0, jitter=0.0
    )
    task = await submit(stub, max_attempts=2, retry_policy=policy)
    worker = raw_workers()
    await worker.connect(credits=5)
    (a1,) = await worker.assignments(1)
    assert (await worker.report(a1.lease, FAILED, error="boom 1")).accepted
    row = await db.fetchrow(
        "SELECT state, run_at, update_time FROM tasks WHERE id = $1::uuid", task.id
    )
    assert row["state"] == task_pb2.TASK_STATE_SCHEDULED
    assert row["run_at"] - row["update_time"] == pytest.approx(
        timedelta(milliseconds=200), abs=timedelta(milliseconds=50)
    )
    (a2,) = await worker.assignments(1)
    assert a2.lease.attempt == 2
    assert (await worker.report(a2.lease, FAILED, error="boom 2")).accepted
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_DEAD
    assert got.task.last_error == "boom 2"
    assert [a.error for a in got.attempts] == ["boom 1", "boom 2"]


async def test_non_retryable_failure_is_dead_at_once_and_redrive_works(
    stub: Stub, raw_workers: Workers
) -> None:
    task = await submit(stub, max_attempts=5)
    worker = raw_workers()
    await worker.connect(credits=5)
    (a1,) = await worker.assignments(1)
    await worker.report(a1.lease, FAILED, error="bad input", retryable=False)
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_DEAD
    redriven = await stub.RetryTask(task_service_pb2.RetryTaskRequest(id=task.id))
    assert redriven.task.state == task_pb2.TASK_STATE_PENDING
    (a2,) = await worker.assignments(1)
    assert a2.lease.attempt == 2
    assert (await worker.report(a2.lease, result=b"1")).accepted
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RetryTask(task_service_pb2.RetryTaskRequest(id=task.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_pending_is_immediate(stub: Stub, db: asyncpg.Connection) -> None:
    task = await submit(stub, type="nobody-runs-this")
    response = await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
    assert response.task.state == task_pb2.TASK_STATE_CANCELLED
    assert await _state(db, task.id) == task_pb2.TASK_STATE_CANCELLED


async def test_cancel_running_is_pushed_to_the_worker(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    task = await submit(stub)
    worker = raw_workers()
    await worker.connect(credits=1)
    (assignment,) = await worker.assignments(1)
    response = await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
    assert response.task.state == task_pb2.TASK_STATE_CANCELLED
    pushed = await worker.receive_kind("cancel_tasks")
    assert [lease.task_id for lease in pushed.leases] == [task.id]
    ack = await worker.report(assignment.lease, worker_service_pb2.TASK_OUTCOME_CANCELLED)
    assert not ack.accepted
    assert await _state(db, task.id) == task_pb2.TASK_STATE_CANCELLED
    outcome = await db.fetchval(
        "SELECT outcome FROM task_attempts WHERE task_id = $1::uuid", task.id
    )
    assert outcome == task_pb2.ATTEMPT_OUTCOME_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RetryTask(task_service_pb2.RetryTaskRequest(id=task.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_delayed_task_waits_for_run_at(stub: Stub, raw_workers: Workers) -> None:
    run_at = timestamp_pb2.Timestamp()
    due = datetime.now(UTC) + timedelta(milliseconds=700)
    run_at.FromDatetime(due)
    await submit(stub, run_at=run_at)
    worker = raw_workers()
    await worker.connect(credits=1)
    (assignment,) = await worker.assignments(1)
    assert datetime.now(UTC) >= due
    assert (await worker.report(assignment.lease)).accepted


async def test_watch_streams_every_state_until_terminal(stub: Stub, raw_workers: Workers) -> None:
    task = await submit(stub)
    seen: list[int] = []

    async def watch() -> None:
        async for update in stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task.id)):
            seen.append(update.task.state)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: _async(bool(seen)))
    worker = raw_workers()
    await worker.connect(credits=1)
    (assignment,) = await worker.assignments(1)
    await eventually(lambda: _async(task_pb2.TASK_STATE_RUNNING in seen))
    await worker.report(assignment.lease)
    await asyncio.wait_for(watcher, 10)
    assert seen == [
        task_pb2.TASK_STATE_PENDING,
        task_pb2.TASK_STATE_RUNNING,
        task_pb2.TASK_STATE_SUCCEEDED,
    ]


async def _async(value: bool) -> bool:
    return value


async def test_list_queues_counts_by_state(stub: Stub, raw_workers: Workers) -> None:
    for _ in range(3):
        await submit(stub, queue="mail")
    await submit(stub, queue="reports")
    worker = raw_workers()
    await worker.connect(credits=1, queues=("mail",))
    await worker.assignments(1)
    response = await stub.ListQueues(task_service_pb2.ListQueuesRequest())
    counts = {q.name: (q.pending, q.running) for q in response.queues}
    assert counts == {"mail": (2, 1), "reports": (1, 0)}


async def test_first_message_must_be_hello(raw_workers: Workers) -> None:
    worker = raw_workers()
    call = worker_service_pb2_grpc.WorkerServiceStub(worker._channel).Connect(
        iter([worker_service_pb2.ConnectRequest(credit=worker_service_pb2.Credit(credits=1))])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Hello" in (caught.value.details() or "")
