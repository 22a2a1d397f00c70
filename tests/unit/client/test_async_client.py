"""AsyncClient against a real gRPC server with a scripted TaskService."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from conveyor.client import (
    AsyncClient,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidStateError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    QueueStats,
    QuotaExceededError,
    RPCError,
    StoreUnavailableError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskSpec,
    TaskState,
    UnavailableError,
    WaitTimeoutError,
)
from conveyor.client._channel import Action, RetryRules, decide
from conveyor.transport import Backoff
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

Code = grpc.StatusCode
StartServer = Callable[[Any], Awaitable[str]]


def _task(task_id: str, state: int, **fields: Any) -> task_pb2.Task:
    return task_pb2.Task(id=task_id, queue="default", type="demo", state=state, **fields)  # type: ignore[arg-type]


def _not_leader(status: Callable[..., grpc.Status], leader: str) -> grpc.Status:
    return status(
        Code.UNAVAILABLE,
        "not the leader",
        reason="NOT_LEADER",
        metadata={"leader_address": leader},
        retry_after=0.001,
    )


# -- calls and conversions ---------------------------------------------------------------


async def test_submit_sends_json_and_returns_task(fake: Any, address: str) -> None:
    async with AsyncClient(address, api_key="secret") as client:
        task = await client.submit(
            "send_email",
            {"to": "ada@example.com"},
            queue="emails",
            priority=3,
            labels={"team": "growth"},
            timeout=timedelta(seconds=30),
        )
    request = fake.requests("SubmitTask")[0]
    assert request.type == "send_email"
    assert json.loads(request.payload) == {"to": "ada@example.com"}
    assert request.content_type == "application/json"
    assert request.timeout.seconds == 30
    assert fake.calls[0][2]["authorization"] == "Bearer secret"
    assert task.state is TaskState.PENDING
    assert (task.queue, task.type, task.priority) == ("emails", "send_email", 3)
    assert task.labels == {"team": "growth"}
    assert task.create_time is not None and task.create_time.tzinfo is not None


async def test_submit_raw_bytes(fake: Any, address: str) -> None:
    async with AsyncClient(address) as client:
        task = await client.submit("resize", b"\x89PNG", content_type="image/png")
    assert task.payload == b"\x89PNG"
    assert fake.requests("SubmitTask")[0].content_type == "image/png"


async def test_submit_many_batches_by_count(fake: Any, address: str) -> None:
    specs = [TaskSpec(type="t", payload=i) for i in range(2300)]
    async with AsyncClient(address) as client:
        tasks = await client.submit_many([*specs[:-1], {"type": "t", "payload": 2299}])
    assert [len(r.tasks) for r in fake.requests("SubmitTasks")] == [1000, 1000, 300]
    assert [t.payload for t in tasks] == [str(i).encode() for i in range(2300)]


async def test_submit_many_batches_by_size(fake: Any, address: str) -> None:
    big = b"x" * (1024 * 1024)
    async with AsyncClient(address) as client:
        tasks = await client.submit_many([{"type": "t", "payload": big} for _ in range(5)])
    assert [len(r.tasks) for r in fake.requests("SubmitTasks")] == [2, 2, 1]
    assert len(tasks) == 5


async def test_submit_many_error_in_later_batch(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    bad = status(
        Code.INVALID_ARGUMENT,
        "bad",
        reason="INVALID_ARGUMENT",
        violations=[("tasks[3].queue", "too long")],
    )
    fake.failures["SubmitTasks"] = [None, bad]
    async with AsyncClient(address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.submit_many([{"type": "t"} for _ in range(1500)])
    # The index is the caller's position in its list, not the batch's.
    assert caught.value.field_violations == [("tasks[1003].queue", "too long")]
    assert "tasks[1003].queue: too long" in str(caught.value)
    assert "1000 task(s) from earlier batches" in str(caught.value)


async def test_get_list_iterate_and_queues(fake: Any, address: str) -> None:
    for i in range(250):
        fake.add_task(id=f"t{i}", state=task_pb2.TASK_STATE_DEAD if i % 2 else 1)
    fake.queues = [task_pb2.QueueStats(name="default", pending=125, dead=125)]
    async with AsyncClient(address) as client:
        task, attempts = await client.get_with_attempts("t1")
        assert task.state is TaskState.DEAD
        assert attempts[0].error == "boom"
        assert (await client.get("t0")).state is TaskState.PENDING

        page = await client.list(state="dead", page_size=100)
        assert len(page) == 100 and page.next_page_token == "100"
        assert all(t.state is TaskState.DEAD for t in page)
        last = await client.list(state=TaskState.DEAD, page_token="100")
        assert len(last) == 25 and last.next_page_token is None

        ids = [t.id async for t in client.iter_tasks(page_size=100)]
        assert ids == [f"t{i}" for i in range(250)]
        assert await client.queues() == [QueueStats(name="default", pending=125, dead=125)]


async def test_cancel_and_retry(fake: Any, address: str) -> None:
    fake.add_task(id="a", state=task_pb2.TASK_STATE_RUNNING)
    fake.add_task(id="b", state=task_pb2.TASK_STATE_DEAD)
    async with AsyncClient(address) as client:
        assert (await client.cancel("a")).state is TaskState.CANCELLED
        assert (await client.retry("b")).state is TaskState.PENDING
        with pytest.raises(InvalidStateError) as caught:
            await client.cancel("a")
    assert caught.value.state is TaskState.CANCELLED
    assert "Only unfinished tasks can be cancelled" in str(caught.value)


async def test_call_timeout(fake: Any, address: str) -> None:
    fake.delay["GetTask"] = 1.0
    async with AsyncClient(address, timeout=0.1) as client:
        with pytest.raises(DeadlineExceededError):
            await client.get("t")


async def test_closed_client_refuses_calls(address: str) -> None:
    client = AsyncClient(address)
    await client.close()
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.get("t")


def test_address_parsing() -> None:
    assert AsyncClient("a:1, b:2,a:1").addresses == ["a:1", "b:2"]
    assert AsyncClient(["a:1", "b:2"]).addresses == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="no coordinator address"):
        AsyncClient(" , ")


# -- failover ----------------------------------------------------------------------------


async def test_follows_not_leader_redirect_even_without_key(
    fake_factory: Callable[[], Any],
    start_server: StartServer,
    status: Callable[..., grpc.Status],
) -> None:
    follower, leader = fake_factory(), fake_factory()
    follower_address = await start_server(follower)
    leader_address = await start_server(leader)
    follower.always_fail["SubmitTask"] = _not_leader(status, leader_address)
    follower.always_fail["GetTask"] = _not_leader(status, leader_address)

    async with AsyncClient(follower_address) as client:
        task = await client.submit("t", {"n": 1})  # no idempotency key: NOT_LEADER is safe
        assert task.id in leader.tasks
        assert await client.get(task.id) == task
    # The client remembered the leader: the second call went straight there.
    assert follower.count("SubmitTask") == 1 and follower.count("GetTask") == 0
    assert leader.count("SubmitTask") == 1


async def test_not_leader_without_known_leader_tries_next_address(
    fake_factory: Callable[[], Any],
    start_server: StartServer,
    status: Callable[..., grpc.Status],
) -> None:
    electing, leader = fake_factory(), fake_factory()
    addresses = [await start_server(electing), await start_server(leader)]
    electing.always_fail["ListQueues"] = _not_leader(status, "")
    async with AsyncClient(addresses) as client:
        assert await client.queues() == []
    assert electing.count("ListQueues") == 1 and leader.count("ListQueues") == 1


async def test_skips_unreachable_address(fake: Any, address: str, dead_address: str) -> None:
    async with AsyncClient([dead_address, address]) as client:
        task = await client.submit("t")  # never sent to the dead address, so safe
    assert fake.count("SubmitTask") == 1
    assert task.type == "t"


async def test_all_unreachable_raises_unavailable(dead_address: str) -> None:
    async with AsyncClient(dead_address, timeout=0.3) as client:
        with pytest.raises(UnavailableError, match="cannot connect") as caught:
            await client.get("t")
    assert "timeout ran out" in str(caught.value)


async def test_reconnects_when_the_coordinator_comes_back(fake: Any, dead_address: str) -> None:
    fake.add_task(id="t")
    host, port = dead_address.rsplit(":", 1)
    tried = asyncio.Event()

    def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tried.set()  # the client tried while no coordinator was there
        writer.close()

    down = await asyncio.start_server(hang_up, host, int(port))
    server = grpc.aio.server()
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(fake, server)

    async def start_later() -> None:
        async with asyncio.timeout(5):
            await tried.wait()
        down.close()
        await down.wait_closed()
        server.add_insecure_port(dead_address)
        await server.start()

    async with AsyncClient(dead_address, timeout=5) as client:
        starter = asyncio.create_task(start_later())
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            assert (await client.get("t")).id == "t"
        finally:
            await starter
            await server.stop(0)
    assert loop.time() - began < 3


async def test_broken_submit_is_resent_under_its_own_key(
    fake_factory: Callable[[], Any], start_server: StartServer
) -> None:
    flaky, healthy = fake_factory(), fake_factory()
    addresses = [await start_server(flaky), await start_server(healthy)]
    # A bare UNAVAILABLE after the call was sent: it may or may not have been applied.
    flaky.always_fail["SubmitTask"] = Code.UNAVAILABLE
    flaky.fail("GetTask", Code.UNAVAILABLE)
    healthy.add_task(id="x")

    async with AsyncClient(addresses) as client:
        await client.submit("t")
        # The resend carried the id the first send had, so the server can deduplicate.
        sent, resent = flaky.requests("SubmitTask")[0], healthy.requests("SubmitTask")[0]
        assert sent.request_id == resent.request_id
        assert uuid.UUID(sent.request_id).version == 7
        assert sent.idempotency_key == ""

        task = await client.submit("t", idempotency_key="k-1")
        assert task.idempotency_key == "k-1"
        assert (await client.get("x")).id == "x"


async def test_without_retry_submits_a_broken_submit_raises(
    fake_factory: Callable[[], Any], start_server: StartServer
) -> None:
    flaky, healthy = fake_factory(), fake_factory()
    addresses = [await start_server(flaky), await start_server(healthy)]
    flaky.always_fail["SubmitTask"] = Code.UNAVAILABLE
    async with AsyncClient(addresses, retry_submits=False) as client:
        with pytest.raises(UnavailableError, match="not resent because it may have reached"):
            await client.submit("t")
        assert flaky.requests("SubmitTask")[0].request_id == ""
        assert healthy.count("SubmitTask") == 0
        # A key of the caller's own still makes it safe.
        assert (await client.submit("t", idempotency_key="k")).idempotency_key == "k"


async def test_submit_many_gives_each_task_its_own_request_id(fake: Any, address: str) -> None:
    async with AsyncClient(address) as client:
        await client.submit_many(
            [{"type": "t"}, {"type": "t", "idempotency_key": "mine"}, {"type": "t"}]
        )
    (batch,) = fake.requests("SubmitTasks")
    ids = [r.request_id for r in batch.tasks]
    assert [r.idempotency_key for r in batch.tasks] == ["", "mine", ""]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    # Increasing: they become task ids, and the tasks of a batch dispatch in order.
    assert ids == sorted(ids) and len(set(ids)) == 3


async def test_outcome_unknown_is_resent_only_with_a_request_id_or_key(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    unknown = status(Code.UNAVAILABLE, "connection lost while committing", reason="OUTCOME_UNKNOWN")
    fake.fail("SubmitTask", unknown)
    async with AsyncClient(address) as client:
        await client.submit("t")
    first, second = fake.requests("SubmitTask")
    assert first.request_id and first.request_id == second.request_id

    fake.fail("SubmitTask", unknown)
    fake.fail("CancelTask", unknown)
    fake.add_task(id="c", state=task_pb2.TASK_STATE_RUNNING)
    async with AsyncClient(address, retry_submits=False) as client:
        with pytest.raises(OutcomeUnknownError, match="not resent"):
            await client.submit("t")
        with pytest.raises(OutcomeUnknownError):
            await client.cancel("c")  # not idempotent: a second cancel would fail
    assert fake.count("SubmitTask") == 3 and fake.count("CancelTask") == 1


async def test_store_unavailable_is_resent_after_retry_info(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    fake.add_task(id="c", state=task_pb2.TASK_STATE_RUNNING)
    fake.fail(
        "CancelTask",
        status(Code.UNAVAILABLE, "db restarting", reason="STORE_UNAVAILABLE", retry_after=0.2),
    )
    loop = asyncio.get_running_loop()
    async with AsyncClient(address, timeout=5) as client:
        began = loop.time()
        # Nothing was written by the refused call, so even a cancel is safe to resend.
        assert (await client.cancel("c")).state is TaskState.CANCELLED
    assert loop.time() - began >= 0.2
    assert fake.count("CancelTask") == 2


async def test_resource_exhausted_waits_for_submits_unless_opted_out(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    full = status(Code.RESOURCE_EXHAUSTED, "backlog full", reason="QUOTA_EXCEEDED", retry_after=0.2)
    fake.fail("SubmitTask", full)
    async with AsyncClient(address, retry_resource_exhausted=False) as client:  # opted out
        with pytest.raises(QuotaExceededError):
            await client.submit("t")
    assert fake.count("SubmitTask") == 1

    fake.fail("SubmitTask", full, times=2)
    loop = asyncio.get_running_loop()
    async with AsyncClient(address, timeout=5, retry_resource_exhausted=True) as client:
        began = loop.time()
        task = await client.submit("t")
    assert loop.time() - began >= 0.4  # RetryInfo honoured before each resend
    assert task.type == "t" and fake.count("SubmitTask") == 4

    # A wait that would end past the deadline is not started: the error comes at once.
    fake.fail(
        "SubmitTask", status(Code.RESOURCE_EXHAUSTED, "x", reason="OVERLOADED", retry_after=30)
    )
    async with AsyncClient(address, timeout=2, retry_resource_exhausted=True) as client:
        began = loop.time()
        with pytest.raises(OverloadedError, match="leaves no room"):
            await client.submit("t")
    assert loop.time() - began < 1.5
    # By default a submit waits as the refusal says (backpressure); other calls do not.
    before = fake.count("SubmitTask")
    fake.fail("SubmitTask", full)
    async with AsyncClient(address, timeout=5) as client:
        assert (await client.submit("t")).type == "t"
    assert fake.count("SubmitTask") == before + 2
    fake.fail("CancelTask", full)
    async with AsyncClient(address, timeout=5) as client:
        with pytest.raises(QuotaExceededError):
            await client.cancel("c")
    assert fake.count("CancelTask") == 1
    # Nor a refusal without RetryInfo (waiting would not help).
    fake.fail("SubmitTask", status(Code.RESOURCE_EXHAUSTED, "too big", reason="QUOTA_EXCEEDED"))
    async with AsyncClient(address, timeout=5) as client:
        with pytest.raises(QuotaExceededError, match="Waiting will not help"):
            await client.submit("t")
    assert fake.count("SubmitTask") == before + 3


def test_retry_rules() -> None:
    """Which failures are resent, for idempotent and other calls (the pure rule)."""

    def error(cls: type[RPCError], reason: str | None = None) -> RPCError:
        return cls("x", code=Code.UNAVAILABLE, reason=reason)

    plain, eager = RetryRules(), RetryRules(retry_resource_exhausted=True)
    cases: list[tuple[RPCError, Action, Action, Action]] = [
        # error, idempotent, not idempotent, idempotent with retry_resource_exhausted
        (error(NotLeaderError, "NOT_LEADER"), Action.REDIRECT, Action.REDIRECT, Action.REDIRECT),
        (error(UnavailableError), Action.NEXT_ADDRESS, Action.RAISE, Action.NEXT_ADDRESS),
        (error(StoreUnavailableError, "STORE_UNAVAILABLE"),) + (Action.SAME_ADDRESS,) * 3,
        (
            error(OutcomeUnknownError, "OUTCOME_UNKNOWN"),
            Action.SAME_ADDRESS,
            Action.RAISE,
            Action.SAME_ADDRESS,
        ),
        (error(OverloadedError, "OVERLOADED"), Action.RAISE, Action.RAISE, Action.SAME_ADDRESS),
        (
            error(QuotaExceededError, "QUOTA_EXCEEDED"),
            Action.RAISE,
            Action.RAISE,
            Action.SAME_ADDRESS,
        ),
        (error(TaskNotFoundError, "TASK_NOT_FOUND"), Action.RAISE, Action.RAISE, Action.RAISE),
        (error(DeadlineExceededError), Action.RAISE, Action.RAISE, Action.RAISE),
    ]
    for err, idempotent, other, eager_action in cases:
        assert decide(err, idempotent=True, rules=plain) is idempotent, err
        assert decide(err, idempotent=False, rules=plain) is other, err
        assert decide(err, idempotent=True, rules=eager) is eager_action, err


# -- watch, wait and result ----------------------------------------------------------------


async def test_watch_reconnects_and_wait_returns_terminal_task(fake: Any, address: str) -> None:
    pending = _task("w", task_pb2.TASK_STATE_PENDING)
    running = _task("w", task_pb2.TASK_STATE_RUNNING, attempt=1)
    done = _task("w", task_pb2.TASK_STATE_SUCCEEDED, attempt=1, result=b'{"sum": 3}')
    fake.add_task(id="w")
    fake.watch_scripts["w"] = [
        [pending, running, Code.UNAVAILABLE],  # the stream breaks mid-way
        [running, done],  # the reopened stream repeats RUNNING
    ]
    async with AsyncClient(address) as client:
        seen = [t.state async for t in client.watch("w")]
        assert seen == [TaskState.PENDING, TaskState.RUNNING, TaskState.SUCCEEDED]
        # The break was followed by a GetTask re-read before reopening the stream.
        assert fake.count("GetTask") == 1 and fake.count("WatchTask") == 2

        fake.watch_scripts["w"] = [[running, Code.UNAVAILABLE], [done]]
        task = await client.wait("w", timeout=5)
        assert task.state is TaskState.SUCCEEDED and task.json() == {"sum": 3}


async def test_watch_gives_up_when_streams_keep_breaking(
    fake: Any, address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.client import _async_client

    monkeypatch.setattr(_async_client, "_WATCH_BACKOFF", Backoff(initial=0.001, maximum=0.005))
    running = _task("w", task_pb2.TASK_STATE_RUNNING)
    fake.add_task(id="w", state=task_pb2.TASK_STATE_RUNNING)
    fake.watch_scripts["w"] = [[running, Code.UNAVAILABLE] for _ in range(20)]
    async with AsyncClient(address) as client:
        with pytest.raises(UnavailableError):
            await client.wait("w", timeout=5)
    # Repeating the same state is no progress: it gave up after the failure budget.
    assert fake.count("WatchTask") == 11


async def test_wait_sees_finish_while_disconnected(fake: Any, address: str) -> None:
    running = _task("w", task_pb2.TASK_STATE_RUNNING)
    dead = _task("w", task_pb2.TASK_STATE_DEAD, attempt=3, last_error="exploded")

    def finish() -> None:
        fake.tasks["w"] = dead

    fake.add_task(id="w", state=task_pb2.TASK_STATE_RUNNING)
    fake.watch_scripts["w"] = [[running, finish, Code.UNAVAILABLE]]
    async with AsyncClient(address) as client:
        with pytest.raises(TaskFailedError, match="exploded") as caught:
            await client.result("w", timeout=5)
    assert caught.value.task.state is TaskState.DEAD
    assert fake.count("WatchTask") == 1  # the re-read found it finished; no second watch


async def test_result_values_and_outcomes(fake: Any, address: str) -> None:
    fake.add_task(id="ok", state=task_pb2.TASK_STATE_SUCCEEDED, result=b"[1, 2]")
    fake.add_task(id="gone", state=task_pb2.TASK_STATE_CANCELLED)
    fake.add_task(id="empty", state=task_pb2.TASK_STATE_SUCCEEDED)
    async with AsyncClient(address) as client:
        assert await client.result("ok") == [1, 2]
        assert await client.result("empty") is None
        with pytest.raises(TaskCancelledError):
            await client.result("gone")


async def test_wait_timeout(fake: Any, address: str, hang: str) -> None:
    fake.add_task(id="slow")
    fake.watch_scripts["slow"] = [[_task("slow", task_pb2.TASK_STATE_RUNNING), hang]]
    async with AsyncClient(address) as client:
        with pytest.raises(WaitTimeoutError) as caught:
            await client.wait("slow", timeout=timedelta(milliseconds=200))
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.task is not None and caught.value.task.state is TaskState.RUNNING
    assert "still RUNNING after waiting 0.2s" in str(caught.value)


async def test_watch_of_unknown_task_raises_at_once(address: str) -> None:
    async with AsyncClient(address) as client:
        with pytest.raises(TaskNotFoundError):
            await client.wait("nope", timeout=5)


async def test_leaving_watch_early_cancels_the_stream(fake: Any, address: str, hang: str) -> None:
    fake.add_task(id="w")
    fake.watch_scripts["w"] = [[_task("w", task_pb2.TASK_STATE_RUNNING), hang]]
    async with AsyncClient(address) as client:
        updates = client.watch("w")
        first = await anext(updates)
        assert first.state is TaskState.RUNNING
        await updates.aclose()
    await asyncio.sleep(0)


async def test_wait_on_an_unserved_task_warns_once_and_says_so(
    fake: Any, address: str, hang: str, caplog: pytest.LogCaptureFixture
) -> None:
    waiting = task_pb2.Task(
        id="u", queue="mail", type="send-email", state=task_pb2.TASK_STATE_PENDING
    )
    fake.add_task(id="u", queue="mail", type="send-email")
    fake.unserved.add("u")
    unserved = task_service_pb2.WatchTaskResponse(task=waiting, unserved=True)
    fake.watch_scripts["u"] = [[unserved, unserved, hang]]
    caplog.set_level(logging.WARNING, logger="conveyor.client")
    async with AsyncClient(address) as client:
        assert (await client.get("u")).unserved
        with pytest.raises(WaitTimeoutError) as caught:
            await client.result("u", timeout=0.3)
    assert "no connected worker serves type 'send-email' on queue 'mail'" in str(caught.value)
    warnings = [r for r in caplog.records if r.name == "conveyor.client"]
    assert len(warnings) == 1
    assert "no connected worker serves type 'send-email'" in warnings[0].getMessage()
