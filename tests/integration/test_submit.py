"""Submits: acknowledgement after commit, validation, idempotency (also under concurrency)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from testsupport import coordinator_config, error_details, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.api import validation
from conveyor.coordinator.lifecycle.submits import SubmitGroup
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

# The aio stub type (type-checking only: the generated module has no such class at run time).
Stub: TypeAlias = "task_service_pb2_grpc.TaskServiceAsyncStub"


def _details(err: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo.reason, BadRequest fields) of a rich error status."""
    details = error_details(err)
    return details.reason, details.fields


async def _count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks"))


async def test_submit_is_committed_when_acknowledged(stub: Stub, db: asyncpg.Connection) -> None:
    response = await stub.SubmitTask(
        task_service_pb2.SubmitTaskRequest(type="echo", payload=b'{"a": 1}', priority=7)
    )
    task = response.task
    assert task.state == task_pb2.TASK_STATE_PENDING
    assert task.queue == "default" and task.max_attempts == 3 and task.attempt == 0
    row = await db.fetchrow(
        "SELECT state, priority, payload, tenant FROM tasks WHERE id = $1::uuid", task.id
    )
    assert row is not None
    assert (row["state"], row["priority"], row["payload"], row["tenant"]) == (
        task_pb2.TASK_STATE_PENDING,
        7,
        b'{"a": 1}',
        "default",
    )


async def test_delayed_submit_is_scheduled(stub: Stub) -> None:
    run_at = timestamp_pb2.Timestamp()
    run_at.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    response = await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo", run_at=run_at))
    assert response.task.state == task_pb2.TASK_STATE_SCHEDULED


def _too_long(n: int) -> str:
    return "x" * n


BAD_REQUESTS = [
    ("empty type", task_service_pb2.SubmitTaskRequest(type=""), "type"),
    ("long type", task_service_pb2.SubmitTaskRequest(type=_too_long(129)), "type"),
    ("bad chars", task_service_pb2.SubmitTaskRequest(type="a b"), "type"),
    ("long queue", task_service_pb2.SubmitTaskRequest(type="t", queue=_too_long(200)), "queue"),
    (
        "oversized payload",
        task_service_pb2.SubmitTaskRequest(type="t", payload=b"x" * ((1 << 20) + 1)),
        "payload",
    ),
    (
        "negative attempts",
        task_service_pb2.SubmitTaskRequest(type="t", max_attempts=-1),
        "max_attempts",
    ),
    (
        "absurd attempts",
        task_service_pb2.SubmitTaskRequest(type="t", max_attempts=10**6),
        "max_attempts",
    ),
    (
        "negative timeout",
        task_service_pb2.SubmitTaskRequest(type="t", timeout=duration_pb2.Duration(seconds=-5)),
        "timeout",
    ),
    (
        "absurd timeout",
        task_service_pb2.SubmitTaskRequest(type="t", timeout=duration_pb2.Duration(seconds=10**8)),
        "timeout",
    ),
    ("priority", task_service_pb2.SubmitTaskRequest(type="t", priority=5000), "priority"),
    (
        "idempotency key",
        task_service_pb2.SubmitTaskRequest(type="t", idempotency_key=_too_long(300)),
        "idempotency_key",
    ),
    (
        "run_at far ahead",
        task_service_pb2.SubmitTaskRequest(
            type="t", run_at=timestamp_pb2.Timestamp(seconds=4_000_000_000)
        ),
        "run_at",
    ),
    (
        "jitter",
        task_service_pb2.SubmitTaskRequest(type="t", retry_policy=task_pb2.RetryPolicy(jitter=3.0)),
        "retry_policy.jitter",
    ),
    # What PostgreSQL would refuse answered UNKNOWN and failed others' submits (issue 7.3).
    (
        "NUL in content_type",
        task_service_pb2.SubmitTaskRequest(type="t", content_type="text/plain\x00"),
        "content_type",
    ),
    (
        "NUL in idempotency_key",
        task_service_pb2.SubmitTaskRequest(type="t", idempotency_key="k\x00"),
        "idempotency_key",
    ),
    (
        "NUL in a label",
        task_service_pb2.SubmitTaskRequest(type="t", labels={"k": "v\x00"}),
        "labels['k']",
    ),
    # The name regex's $ matched before a trailing newline (issue 7.3).
    (
        "queue with a newline",
        task_service_pb2.SubmitTaskRequest(type="t", queue="default\n"),
        "queue",
    ),
    # An out-of-range run_at raised out of validation: UNKNOWN (issue 7.10).
    (
        "run_at out of range",
        task_service_pb2.SubmitTaskRequest(
            type="t", run_at=timestamp_pb2.Timestamp(seconds=-62_135_596_801)
        ),
        "run_at",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_submit_names_the_field_and_writes_nothing(
    stub: Stub,
    db: asyncpg.Connection,
    case: str,
    request_: task_service_pb2.SubmitTaskRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTask(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = _details(caught.value)
    assert reason == "INVALID_ARGUMENT"
    assert field in fields
    assert await _count(db) == 0


async def test_batch_with_one_bad_task_writes_nothing(stub: Stub, db: asyncpg.Connection) -> None:
    tasks = [task_service_pb2.SubmitTaskRequest(type="ok") for _ in range(5)]
    tasks.insert(3, task_service_pb2.SubmitTaskRequest(type=""))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTasks(task_service_pb2.SubmitTasksRequest(tasks=tasks))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[1] == ["tasks[3].type"]
    assert await _count(db) == 0


async def test_unknown_enum_and_malformed_ids_are_invalid(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTasks(task_service_pb2.ListTasksRequest(state=99))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[1] == ["state"]
    for call in (stub.GetTask, stub.CancelTask, stub.RetryTask):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(task_service_pb2.GetTaskRequest(id="not-a-uuid"))  # type: ignore[arg-type]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(caught.value)[1] == ["id"]


async def test_missing_task_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTask(
            task_service_pb2.GetTaskRequest(id="01900000-0000-7000-8000-000000000000")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _details(caught.value)[0] == "TASK_NOT_FOUND"


async def test_same_key_same_request_returns_the_first_task(
    stub: Stub, db: asyncpg.Connection
) -> None:
    request = task_service_pb2.SubmitTaskRequest(type="echo", payload=b"1", idempotency_key="k")
    first = await stub.SubmitTask(request)
    second = await stub.SubmitTask(request)
    assert second.task.id == first.task.id
    assert (first.deduplicated, second.deduplicated) == (False, True)
    assert await _count(db) == 1


async def test_same_key_different_request_is_refused(stub: Stub, db: asyncpg.Connection) -> None:
    await stub.SubmitTask(
        task_service_pb2.SubmitTaskRequest(type="echo", payload=b"1", idempotency_key="k")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTask(
            task_service_pb2.SubmitTaskRequest(type="echo", payload=b"2", idempotency_key="k")
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _details(caught.value)[0] == "IDEMPOTENCY_KEY_CONFLICT"
    assert await _count(db) == 1


async def test_concurrent_submits_with_one_key_make_one_task(
    stub: Stub, db: asyncpg.Connection
) -> None:
    request = task_service_pb2.SubmitTaskRequest(type="echo", payload=b"x", idempotency_key="race")
    responses = await asyncio.gather(*(stub.SubmitTask(request) for _ in range(50)))
    ids = {r.task.id for r in responses}
    assert len(ids) == 1
    assert sum(not r.deduplicated for r in responses) == 1
    assert await _count(db) == 1


async def test_concurrent_conflicting_submits_commit_exactly_one(
    stub: Stub, db: asyncpg.Connection
) -> None:
    async def attempt(i: int) -> str | None:
        try:
            response = await stub.SubmitTask(
                task_service_pb2.SubmitTaskRequest(
                    type="echo", payload=str(i).encode(), idempotency_key="contested"
                )
            )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            return None
        return response.task.id

    winners = [w for w in await asyncio.gather(*(attempt(i) for i in range(30))) if w]
    assert len(winners) == 1
    assert await _count(db) == 1


async def test_batch_conflict_rolls_back_the_whole_batch(
    stub: Stub, db: asyncpg.Connection
) -> None:
    await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo", idempotency_key="taken"))
    batch = [
        task_service_pb2.SubmitTaskRequest(type="echo", payload=b"new"),
        task_service_pb2.SubmitTaskRequest(type="other", idempotency_key="taken"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTasks(task_service_pb2.SubmitTasksRequest(tasks=batch))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await _count(db) == 1


async def test_list_tasks_paginates_newest_first(stub: Stub) -> None:
    batch = [
        task_service_pb2.SubmitTaskRequest(type="echo", payload=str(i).encode()) for i in range(7)
    ]
    submitted = await stub.SubmitTasks(task_service_pb2.SubmitTasksRequest(tasks=batch))
    expected = sorted((r.task.id for r in submitted.results), reverse=True)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListTasks(
            task_service_pb2.ListTasksRequest(page_size=3, page_token=token)
        )
        seen.extend(t.id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert seen == expected


async def test_40_good_submits_and_one_bad_one_at_once(stub: Stub, db: asyncpg.Connection) -> None:
    """The bad one shared the good ones' transaction and failed two of them (issue 7.3)."""
    good = [
        stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo", payload=str(i).encode()))
        for i in range(40)
    ]
    bad = stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo", content_type="\x00"))
    outcomes = await asyncio.gather(*good[:20], bad, *good[20:], return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1
    assert isinstance(failed[0], grpc.aio.AioRpcError)
    assert failed[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _count(db) == 40


async def test_a_flush_the_store_refuses_fails_only_the_culprit(
    coordinator: Coordinator, db: asyncpg.Connection
) -> None:
    """Below validation: a task PostgreSQL refuses shares a flush with 40 good ones; the
    flush is retried item by item and only the culprit's caller hears the error."""
    assert coordinator.submitter is not None
    batcher = coordinator.submitter.batcher

    def group(content_type: str) -> SubmitGroup:
        task = validation.validate_submit_one(
            task_service_pb2.SubmitTaskRequest(type="echo"), max_payload_bytes=1024
        )
        return SubmitGroup("default", [dataclasses.replace(task, content_type=content_type)])

    # Enqueued in one go, so one flush takes them all.
    futures = [batcher.enqueue(group("application/json")) for _ in range(20)]
    futures.append(batcher.enqueue(group("bad\x00")))
    futures += [batcher.enqueue(group("application/json")) for _ in range(20)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], asyncpg.DataError)
    assert batcher.isolations >= 1
    assert await _count(db) == 40


async def test_an_undecodable_request_is_invalid_argument(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/conveyor.v1.TaskService/SubmitTask"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\x12\x02\xff\xfe")  # field 2 (type), a string that is not UTF-8
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_fifty_submits_with_one_key_and_one_that_differs(
    stub: Stub, db: asyncpg.Connection
) -> None:
    same = task_service_pb2.SubmitTaskRequest(type="echo", payload=b"x", idempotency_key="race")
    odd = task_service_pb2.SubmitTaskRequest(type="echo", payload=b"y", idempotency_key="race")
    calls = [stub.SubmitTask(same) for _ in range(50)]
    calls.insert(25, stub.SubmitTask(odd))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    answers = [o for o in outcomes if isinstance(o, task_service_pb2.SubmitTaskResponse)]
    assert await _count(db) == 1
    assert len({a.task.id for a in answers}) == 1
    # The odd one is refused, unless it came first: then the 50 are.
    if len(errors) == 1:
        assert len(answers) == 50
    else:
        assert len(answers) == 1 and len(errors) == 50
    assert {error_details(e).reason for e in errors} == {"IDEMPOTENCY_KEY_CONFLICT"}
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}


async def test_past_the_backlog_limit_submits_are_refused_and_nothing_is_written(
    database_dsn: str,
) -> None:
    coordinator = Coordinator(coordinator_config(database_dsn, max_backlog=5))
    await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            for _ in range(3):
                await stub.SubmitTask(task_service_pb2.SubmitTaskRequest(type="echo"))
            batch = [task_service_pb2.SubmitTaskRequest(type="echo")] * 3
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitTasks(task_service_pb2.SubmitTasksRequest(tasks=batch))
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.reason == "QUOTA_EXCEEDED"
        assert details.quota_subjects == ["max_backlog"]
        assert details.retry_after is not None and details.retry_after > 0
        conn = await asyncpg.connect(database_dsn)
        try:
            assert await _count(conn) == 3
        finally:
            await conn.close()
    finally:
        await coordinator.stop(grace=1.0)


async def _terminate_coordinator_backends(db: asyncpg.Connection, where: str) -> int:
    """Terminates the coordinator's PostgreSQL backends that match ``where`` (as a restart
    would); returns how many."""
    return int(
        await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE application_name = 'conveyor-coordinator' AND {where}"
        )
    )


_SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.queue = 'slow' THEN PERFORM pg_sleep(60); END IF;
    RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON tasks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


@pytest.mark.parametrize("key", ["", "with-a-key"], ids=["autocommit insert", "transaction"])
async def test_a_connection_lost_while_committing_is_outcome_unknown(
    stub: Stub, db: asyncpg.Connection, key: str
) -> None:
    """The insert may have committed: "retry shortly" would invite a duplicate (issue 7.10)."""
    await db.execute(_SLOW_COMMIT)
    call = asyncio.ensure_future(
        stub.SubmitTask(
            task_service_pb2.SubmitTaskRequest(type="echo", queue="slow", idempotency_key=key)
        )
    )

    # The coordinator's backend, inside the commit-time trigger.
    await eventually(lambda: _terminate_coordinator_backends(db, "wait_event = 'PgSleep'"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN")
    assert details.retry_after is None and "idempotency key" in details.message


async def test_a_postgresql_restart_during_a_call_is_unavailable_with_retry_info(
    stub: Stub, db: asyncpg.Connection
) -> None:
    """57P01 (the server shutting a connection down) reached clients as UNKNOWN (issue 7.10)."""
    task = await submit(stub)
    async with db.transaction():
        await db.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        call = asyncio.ensure_future(stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id)))

        async def call_ended() -> bool | None:
            # Every coordinator backend waiting for the lock, until the call's own was
            # among them: the leader's loops (the firer, the sweeps) wait for it too, and
            # one of theirs could be the only one waiting at the first look.
            await _terminate_coordinator_backends(db, "wait_event_type = 'Lock'")
            return True if call.done() else None

        await eventually(call_ended, what="the call's backend terminated")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert details.retry_after is not None
    # And the next call gets a fresh connection.
    assert (await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))).task.id == task.id


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (task_service_pb2.ListTasksRequest(queue="default\n"), "queue"),
        (task_service_pb2.ListTasksRequest(page_token="\x00"), "page_token"),
    ],
)
async def test_bad_list_filters_are_invalid(
    stub: Stub, request_: task_service_pb2.ListTasksRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTasks(request_)
    assert error_details(caught.value).fields == [field]
