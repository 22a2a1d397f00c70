"""The worker stream, driven message by message: credit, leases, results, retries, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from testsupport import (
    TEST_LEASE,
    ErrorDetails,
    RawWorker,
    coordinator_config,
    error_details,
    eventually,
    submit,
)

from conveyor.coordinator import Coordinator
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

# The aio stub type (type-checking only: the generated module has no such class at run time).
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"
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


async def test_credit_carried_in_results_is_read_as_a_credit_message(
    stub: Stub, raw_workers: Workers
) -> None:
    worker = raw_workers()
    welcome = await worker.connect(credits=2)
    assert welcome.credit_in_results
    for _ in range(5):
        await submit(stub)
    first = await worker.assignments(2)
    # The two results give back two slots, and a third one more, in their message.
    await worker.send(
        results=worker_service_pb2.Results(
            results=[
                worker_service_pb2.TaskResult(
                    lease=a.lease, outcome=worker_service_pb2.TASK_OUTCOME_SUCCEEDED
                )
                for a in first
            ],
            credits=3,
        )
    )
    # The credit is read before the results: the assignments may come before the acks.
    got: list[worker_service_pb2.Assignment] = []
    accepted: list[bool] = []
    while len(got) < 3 or not accepted:
        message = await worker.receive()
        if message.WhichOneof("message") == "assignments":
            got.extend(message.assignments.assignments)
        elif message.WhichOneof("message") == "result_acks":
            accepted = [a.accepted for a in message.result_acks.acks]
    assert accepted == [True, True]
    assert len({a.lease.task_id for a in first + got}) == 5


async def test_a_numbered_results_message_is_answered_by_its_number_and_refusals(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    worker = raw_workers()
    welcome = await worker.connect("numbered", credits=2)
    assert welcome.result_acks_by_sequence
    for _ in range(2):
        await submit(stub)
    held = await worker.assignments(2)
    succeeded = worker_service_pb2.TASK_OUTCOME_SUCCEEDED
    garbage = worker_service_pb2.Lease(task_id="garbage", attempt=1, epoch=1)
    stale = worker_service_pb2.Lease(
        task_id=held[0].lease.task_id, attempt=9, epoch=held[0].lease.epoch
    )
    await worker.send(
        results=worker_service_pb2.Results(
            results=[
                worker_service_pb2.TaskResult(lease=held[0].lease, outcome=succeeded),
                worker_service_pb2.TaskResult(lease=garbage, outcome=succeeded),
                worker_service_pb2.TaskResult(lease=held[1].lease, outcome=succeeded),
                worker_service_pb2.TaskResult(lease=stale, outcome=succeeded),
            ],
            sequence=7,
        )
    )
    acks = await worker.receive_kind("result_acks")
    # Only the refused ones, by lease; the two others were accepted by the number.
    assert acks.sequence == 7
    assert [(a.lease.task_id, a.lease.attempt, a.accepted) for a in acks.acks] == [
        ("garbage", 1, False),
        (stale.task_id, 9, False),
    ]
    assert all(a.reason for a in acks.acks)
    states = await db.fetch("SELECT state FROM tasks")
    assert [r["state"] for r in states] == [task_pb2.TASK_STATE_SUCCEEDED] * 2
    # Every result accepted: an answer with the number alone.
    await submit(stub)
    await worker.send(credit=worker_service_pb2.Credit(credits=1))
    (third,) = await worker.assignments(1)
    await worker.send(
        results=worker_service_pb2.Results(
            results=[worker_service_pb2.TaskResult(lease=third.lease, outcome=succeeded)],
            sequence=8,
        )
    )
    acks = await worker.receive_kind("result_acks")
    assert acks.sequence == 8 and not acks.acks


async def test_credit_in_results_beyond_the_limit_is_a_protocol_violation(
    coordinator: Coordinator,
) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        workers = worker_service_pb2_grpc.WorkerServiceStub(channel)
        hello = worker_service_pb2.ConnectRequest(hello=_hello(worker_id="greedy", credits=3))
        bad = worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(credits=-1))
        call = workers.Connect(iter([hello, bad]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    details = error_details(caught.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROTOCOL_VIOLATION",
    )
    assert "Results.credits -1 is out of range" in details.message


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
    token = (await first.connect("phoenix", credits=2)).resume_token
    assignments = {a.lease.task_id: a for a in await first.assignments(2)}
    await first.close()
    second = raw_workers()
    welcome = await second.connect(
        "phoenix", credits=0, in_flight=(assignments[kept.id].lease,), resume_token=token
    )
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
    # A cancelled task may be redriven (issue 20, break 6): PENDING, with a fresh budget.
    retried = await stub.RetryTask(task_service_pb2.RetryTaskRequest(id=task.id))
    assert retried.task.state == task_pb2.TASK_STATE_PENDING
    assert retried.task.uncounted_attempts == retried.task.attempt == 1


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


# -- hardening (issue 7) --------------------------------------------------------------------


async def _protocol_error(hello: worker_service_pb2.Hello, address: str) -> ErrorDetails:
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(
            iter([worker_service_pb2.ConnectRequest(hello=hello)])
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    return error_details(caught.value)


def _hello(**fields: object) -> worker_service_pb2.Hello:
    values: dict[str, object] = {
        "protocol_version": 1,
        "worker_id": "w",
        "task_types": ["echo"],
        "credits": 1,
        **fields,
    }
    return worker_service_pb2.Hello(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # Empty task types meant "anything": a worker with no handler for a type killed
        # its tasks (issue 7.2).
        ({"task_types": []}, "hello.task_types"),
        ({"worker_id": "w\x00"}, "hello.worker_id"),
        ({"queues": ["default\n"]}, "hello.queues[0]"),
        ({"credits": -1}, "hello.credits"),
        ({"task_types": ["bad type"]}, "hello.task_types[0]"),
    ],
)
async def test_a_bad_hello_is_refused_naming_the_field(
    coordinator: Coordinator, fields: dict[str, object], field: str
) -> None:
    details = await _protocol_error(_hello(**fields), coordinator.address)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "PROTOCOL_VIOLATION"
    assert field in details.fields


async def test_a_worker_is_assigned_only_the_types_it_serves(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    unserved = [await submit(stub, "other") for _ in range(5)]
    served = await submit(stub, "echo")
    worker = raw_workers()
    await worker.connect(credits=10, types=("echo",))
    (only,) = await worker.assignments(1)
    assert only.lease.task_id == served.id
    for task in unserved:
        got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
        assert got.task.state == task_pb2.TASK_STATE_PENDING and got.unserved
    assert not (await stub.GetTask(task_service_pb2.GetTaskRequest(id=served.id))).unserved


async def test_80_one_mib_payloads_arrive_in_messages_under_the_default_limit(
    stub: Stub, raw_workers: Workers
) -> None:
    """One claim of 80 x 1 MiB was one 80 MiB message: the stream died and every task ended
    DEAD without running (issue 7.1). The raw worker has gRPC's default 4 MiB limit."""
    payload = b"x" * (1 << 20)
    for _ in range(8):
        await stub.SubmitTasks(
            task_service_pb2.SubmitTasksRequest(
                tasks=[task_service_pb2.SubmitTaskRequest(type="echo", payload=payload)] * 10
            )
        )
    worker = raw_workers()
    await worker.connect(credits=100)
    got = await worker.assignments(80, timeout=60)
    assert len({a.lease.task_id for a in got}) == 80
    assert all(len(a.payload) == len(payload) for a in got)


async def test_a_stale_result_beside_the_current_one_is_refused_and_recorded(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    """Results were matched by task id alone: a stale result flushed with the current
    attempt's result was acknowledged and never recorded as refused (issue 7.8)."""
    task = await submit(stub)
    worker = raw_workers()
    await worker.connect("w", credits=1)
    (first,) = await worker.assignments(1)
    # No renewal: the lease expires and the task comes back to the same worker.
    await eventually(lambda: _is(db, task.id, task_pb2.TASK_STATE_PENDING), timeout=TEST_LEASE * 5)
    await worker.send(credit=worker_service_pb2.Credit(credits=1))
    (second,) = await worker.assignments(1)
    assert second.lease.attempt == first.lease.attempt + 1
    succeeded = worker_service_pb2.TASK_OUTCOME_SUCCEEDED
    await worker.send(
        results=worker_service_pb2.Results(
            results=[
                worker_service_pb2.TaskResult(lease=first.lease, outcome=succeeded, result=b"1"),
                worker_service_pb2.TaskResult(lease=second.lease, outcome=succeeded, result=b"2"),
            ]
        )
    )
    acks = await worker.receive_kind("result_acks")
    assert [(a.lease.attempt, a.accepted) for a in acks.acks] == [(1, False), (2, True)]
    refused = await db.fetch("SELECT attempt, worker_id FROM refused_results")
    assert [(r["attempt"], r["worker_id"]) for r in refused] == [(1, "w")]
    assert await db.fetchval("SELECT result FROM tasks") == b"2"


async def test_a_task_the_worker_never_received_does_not_use_an_attempt(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    """A lease the worker leaves out of Hello.in_flight was never received: it went back
    counted, so with max_attempts=1 the task died without running (issue 7.4)."""
    task = await submit(stub, max_attempts=1)
    first = raw_workers()
    token = (await first.connect("phoenix", credits=1)).resume_token
    await first.assignments(1)
    await first.close()
    again = raw_workers()
    await again.connect("phoenix", credits=1, resume_token=token)
    (retry,) = await again.assignments(1)
    assert retry.lease.attempt == 2
    assert (await again.report(retry.lease)).accepted
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert (got.task.attempt, got.task.uncounted_attempts) == (2, 1)
    assert [a.outcome for a in got.attempts] == [
        task_pb2.ATTEMPT_OUTCOME_NOT_STARTED,
        task_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    ]


async def test_an_interrupted_attempt_is_ready_again_at_once_and_does_not_count(
    stub: Stub, raw_workers: Workers
) -> None:
    task = await submit(stub, max_attempts=1)
    worker = raw_workers()
    await worker.connect(credits=2)
    (first,) = await worker.assignments(1)
    ack = await worker.report(first.lease, worker_service_pb2.TASK_OUTCOME_INTERRUPTED)
    assert ack.accepted
    (second,) = await worker.assignments(1)
    assert (await worker.report(second.lease)).accepted
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED and got.task.uncounted_attempts == 1
    assert [a.outcome for a in got.attempts] == [
        task_pb2.ATTEMPT_OUTCOME_INTERRUPTED,
        task_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    ]


async def test_a_nul_byte_in_an_error_text_harms_no_result(
    stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    """A NUL in one worker's error text failed the shared result flush (issue 7.3)."""
    tasks = [await submit(stub, max_attempts=1) for _ in range(2)]
    worker = raw_workers()
    await worker.connect(credits=2)
    first, second = await worker.assignments(2)
    await worker.send(
        results=worker_service_pb2.Results(
            results=[
                worker_service_pb2.TaskResult(lease=first.lease, outcome=FAILED, error="a\x00b"),
                worker_service_pb2.TaskResult(
                    lease=second.lease, outcome=worker_service_pb2.TASK_OUTCOME_SUCCEEDED
                ),
            ]
        )
    )
    acks = await worker.receive_kind("result_acks")
    assert [a.accepted for a in acks.acks] == [True, True]
    states = {
        r["id"]: r["last_error"] for r in await db.fetch("SELECT id::text, last_error FROM tasks")
    }
    assert states[first.lease.task_id] == "a\\x00b"
    assert len(states) == len(tasks)


async def test_a_silent_worker_is_evicted_and_its_leases_come_back(database_dsn: str) -> None:
    """A worker whose connection stays open but says nothing was never evicted (issue 7.7).
    Its lease comes back at eviction, long before the lease would have expired."""
    config = coordinator_config(database_dsn, lease_duration=30.0, liveness_timeout=1.5)
    coordinator = Coordinator(config)
    await coordinator.start()
    silent = RawWorker(coordinator.address)
    db = await asyncpg.connect(database_dsn)
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            task = await submit(task_service_pb2_grpc.TaskServiceStub(channel))
        welcome = await silent.connect("mute", credits=1, pulse=False)
        assert welcome.liveness_timeout.ToTimedelta().total_seconds() == 1.5
        await silent.assignments(1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await silent.call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "evicted" in (caught.value.details() or "")
        row = await db.fetchrow("SELECT state, worker_id FROM tasks WHERE id = $1::uuid", task.id)
        assert (row["state"], row["worker_id"]) == (task_pb2.TASK_STATE_PENDING, None)
        outcome = await db.fetchval("SELECT outcome FROM task_attempts")
        assert outcome == task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED  # it may have run: counted
        status = await _cluster_status(coordinator.address)
        (eviction,) = status.recent_evictions
        assert eviction.worker_id == "mute" and eviction.released == 1
        assert "no message for 1.5s" in eviction.reason
    finally:
        await silent.close()
        await db.close()
        await coordinator.stop(grace=1.0)


async def test_a_stream_that_stops_reading_is_cut_and_its_tasks_go_elsewhere(
    coordinator: Coordinator,
    stub: Stub,
    raw_workers: Workers,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing sent to one worker may wait for it: a worker that stops reading is evicted
    (its outbox stays bounded), and another worker gets its tasks."""
    from conveyor.coordinator.dispatch.sessions import OUTBOX_BYTES

    payload = b"p" * (200 << 10)
    ids = [
        r.task.id
        for r in (
            await stub.SubmitTasks(
                task_service_pb2.SubmitTasksRequest(
                    tasks=[task_service_pb2.SubmitTaskRequest(type="echo", payload=payload)] * 60
                )
            )
        ).results
    ]
    stuck = raw_workers()
    await stuck.connect("stuck", credits=60)  # and never reads again
    peak = 0

    async def evicted() -> bool:
        nonlocal peak
        session = coordinator.sessions.by_worker("default", "stuck")
        if session is not None:
            peak = max(peak, OUTBOX_BYTES - session.outbox_room)
        return any(e.worker_id == "stuck" for e in coordinator.sessions.evictions)

    await eventually(evicted, timeout=30, interval=0.01)
    assert peak <= OUTBOX_BYTES
    reason = next(e.reason for e in coordinator.sessions.evictions if e.worker_id == "stuck")
    assert "stopped reading" in reason
    rescuer = raw_workers()
    await rescuer.connect("rescuer", credits=60)
    got = await rescuer.assignments(60, timeout=30)
    assert sorted(a.lease.task_id for a in got) == sorted(ids)
    # Cut without a status (none can follow a write it never takes), and quietly.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_second_process_with_the_same_worker_id_is_refused(
    coordinator: Coordinator, stub: Stub, raw_workers: Workers, db: asyncpg.Connection
) -> None:
    """Two processes with one worker id took each other's running tasks back (issue 7.12)."""
    task = await submit(stub)
    first = raw_workers()
    token = (await first.connect("twin", credits=1, hostname="host-a", pid=10)).resume_token
    (assignment,) = await first.assignments(1)
    details = await _protocol_error(
        _hello(worker_id="twin", hostname="host-b", pid=11), coordinator.address
    )
    assert (details.code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "WORKER_ID_IN_USE")
    assert details.metadata["worker_id"] == "twin"
    assert await _state(db, task.id) == task_pb2.TASK_STATE_RUNNING
    # The same process reconnecting (its resume token) retires its old stream instead.
    again = raw_workers()
    await again.connect("twin", credits=0, in_flight=(assignment.lease,), resume_token=token)
    await asyncio.wait_for(_until_ended(first), 10)
    assert (await again.report(assignment.lease)).accepted


async def test_status_shows_workers_their_types_and_load(
    coordinator: Coordinator, stub: Stub, raw_workers: Workers
) -> None:
    await submit(stub, queue="mail")
    worker = raw_workers()
    await worker.connect("w1", credits=5, queues=("mail", "sms"), types=("echo", "ping"))
    await worker.assignments(1)
    status = await _cluster_status(coordinator.address)
    (info,) = status.workers
    assert list(info.task_types) == ["echo", "ping"] and info.in_flight == 1
    queues = await stub.ListQueues(task_service_pb2.ListQueuesRequest())
    # "sms" has no task, but its worker: listed too (issue 20, break 4).
    assert {q.name: q.workers for q in queues.queues} == {"mail": 1, "sms": 1}


async def _until_ended(worker: RawWorker) -> None:
    """Reads the worker's stream until the coordinator ends it (cleanly or not)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await worker.call.read() is not grpc.aio.EOF:
            pass


async def _cluster_status(address: str) -> admin_service_pb2.GetClusterStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_service_pb2_grpc.AdminServiceStub(channel).GetClusterStatus(
            admin_service_pb2.GetClusterStatusRequest(), timeout=5
        )


async def test_a_protocol_violation_while_assignments_are_written_ends_with_its_status(
    coordinator: Coordinator, stub: Stub
) -> None:
    """gRPC cannot send a status while a write is on its way: aborting while assignments
    were being written answered INTERNAL ("Internal error from Core") instead of the
    violation."""
    payload = b"x" * (1 << 20)
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        workers = worker_service_pb2_grpc.WorkerServiceStub(channel)
        for round_ in range(10):
            await stub.SubmitTasks(
                task_service_pb2.SubmitTasksRequest(
                    tasks=[task_service_pb2.SubmitTaskRequest(type="echo", payload=payload)] * 3
                )
            )
            hello = worker_service_pb2.ConnectRequest(
                hello=_hello(worker_id=f"w{round_}", credits=3)
            )
            bad = worker_service_pb2.ConnectRequest(credit=worker_service_pb2.Credit(credits=-1))
            call = workers.Connect(iter([hello, bad]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            details = error_details(caught.value)
            assert (details.code, details.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "PROTOCOL_VIOLATION",
            )
