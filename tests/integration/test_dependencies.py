"""Task dependencies end to end, through the client library and the worker SDK in-process
against a real coordinator and database: chains, fan-out and fan-in in one DAG submit,
the policies for a dead or cancelled dependency (down a chain), dependencies finished
before the submit, cancel of a BLOCKED task, the errors, and an idempotent DAG resend.

Every ordering claim is checked against what the handlers saw (a dependent's run starts
after each of its dependencies' runs ended), every state against the database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from clitools import conveyor
from testsupport import eventually

from conveyor.client import (
    AsyncClient,
    InvalidArgumentError,
    TaskNotFoundError,
    TaskSpec,
    TaskState,
)
from conveyor.coordinator import Coordinator
from conveyor.coordinator.ids import uuid7
from conveyor.v1 import (
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from conveyor.worker import NonRetryableError, TaskContext, Worker


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(coordinator.address) as c:
        yield c


class Gates:
    """Tasks of type "gate" run until the test opens their gate (by payload name); every
    handler run is logged as it starts and ends (``events``), in the order they happen."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.events: list[tuple[str, str]] = []

    def ran_after(self, task_id: str, dependency: str) -> bool:
        """Whether ``task_id`` first started after ``dependency`` first ended."""
        started = self.events.index(("start", task_id))
        return started > self.events.index(("end", dependency))

    def event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    def open(self, name: str) -> None:
        self.event(name).set()


@pytest.fixture
async def gates(coordinator: Coordinator) -> AsyncIterator[Gates]:
    gates = Gates()
    worker = Worker(coordinator.address, concurrency=16, grace_period=1.0)

    @worker.task("ok")
    async def ok(ctx: TaskContext, payload: Any) -> Any:
        gates.events += [("start", ctx.task_id), ("end", ctx.task_id)]
        return payload

    @worker.task("fail")
    async def fail(ctx: TaskContext, payload: Any) -> None:
        gates.events += [("start", ctx.task_id), ("end", ctx.task_id)]
        raise NonRetryableError("broken on purpose")

    @worker.task("gate")
    async def gate(ctx: TaskContext, payload: str) -> str:
        gates.events.append(("start", ctx.task_id))
        await gates.event(payload).wait()
        gates.events.append(("end", ctx.task_id))
        return payload

    run = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.wait_for(worker.wait_connected(), 10)
    try:
        yield gates
    finally:
        worker.shutdown(force=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)


async def _first_start(db: asyncpg.Connection, task_id: str) -> Any:
    return await db.fetchval(
        "SELECT min(start_time) FROM task_attempts WHERE task_id = $1", uuid.UUID(task_id)
    )


async def test_a_chain_waits_blocked_and_runs_in_order(
    client: AsyncClient, gates: Gates, db: asyncpg.Connection
) -> None:
    a = await client.submit("gate", "a")
    b = await client.submit("ok", "b", after=[a])
    c = await client.submit("ok", "c", after=[b.id])
    assert b.state is TaskState.BLOCKED and c.state is TaskState.BLOCKED
    assert (await client.get(b.id)).waiting_for == (a.id,)
    blocked = await client.list(state=TaskState.BLOCKED)
    assert {t.id for t in blocked} == {b.id, c.id}
    assert await db.fetchval("SELECT deps_left FROM tasks WHERE id = $1", uuid.UUID(c.id)) == 1

    gates.open("a")
    assert (await client.wait(c.id, timeout=10)).state is TaskState.SUCCEEDED
    # Each started only after the one before it ended.
    assert gates.ran_after(b.id, a.id) and gates.ran_after(c.id, b.id)
    assert (await client.get(c.id)).waiting_for == ()
    assert await db.fetchval("SELECT count(*) FROM task_edges") == 0


async def test_a_released_dependent_is_a_webhook_event(
    coordinator: Coordinator, client: AsyncClient, gates: Gates, db: asyncpg.Connection
) -> None:
    # The release moves the dependent inside the finishing statement of its dependency:
    # the outbox fragment of that statement must see it as well as the finished task.
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        hooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
        await hooks.CreateWebhook(
            # .invalid never resolves: the deliveries fail, the outbox is what is checked.
            webhook_service_pb2.CreateWebhookRequest(url="https://hooks.invalid/", types=["ok"]),
            timeout=10,
        )
    gate = await client.submit("gate", "event")
    dependent = await client.submit("ok", "d", after=[gate])
    gates.open("event")
    assert (await client.wait(dependent.id, timeout=10)).state is TaskState.SUCCEEDED
    moves = await db.fetch(
        "SELECT from_state, to_state FROM webhook_outbox WHERE task_id = $1 ORDER BY id",
        uuid.UUID(dependent.id),
    )
    S = task_pb2
    assert [(m["from_state"], m["to_state"]) for m in moves] == [
        (S.TASK_STATE_UNSPECIFIED, S.TASK_STATE_BLOCKED),
        (S.TASK_STATE_BLOCKED, S.TASK_STATE_PENDING),
        (S.TASK_STATE_PENDING, S.TASK_STATE_RUNNING),
        (S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED),
    ]


async def test_a_dag_in_one_submit_fans_out_and_in(
    client: AsyncClient,
    gates: Gates,
    db: asyncpg.Connection,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    # Refs may point forward: the sink comes first, the root last.
    specs = [
        TaskSpec(type="ok", payload="sink", ref="sink", after_refs=[f"m{i}" for i in range(5)]),
        *(TaskSpec(type="ok", payload=i, ref=f"m{i}", after_refs=["root"]) for i in range(5)),
        TaskSpec(type="gate", payload="root", ref="root"),
    ]
    tasks = await client.submit_many(specs)
    sink, mids, root = tasks[0], tasks[1:6], tasks[6]
    assert [t.state for t in tasks[:6]] == [TaskState.BLOCKED] * 6
    assert set((await client.get(sink.id)).waiting_for) == {m.id for m in mids}

    gates.open("root")
    assert (await client.wait(sink.id, timeout=10)).state is TaskState.SUCCEEDED
    assert all(gates.ran_after(mid.id, root.id) for mid in mids)
    assert all(gates.ran_after(sink.id, mid.id) for mid in mids)

    # A resend of the same DAG returns the same tasks: by idempotency keys, and by the
    # request ids a client library resends with.
    keyed = [
        TaskSpec(type="ok", payload=1, ref="x", idempotency_key="dag-x"),
        TaskSpec(type="ok", payload=2, after_refs=["x"], idempotency_key="dag-y"),
    ]
    first = await client.submit_many(keyed)
    again = await client.submit_many(keyed)
    assert [t.id for t in again] == [t.id for t in first]
    request = task_service_pb2.SubmitTasksRequest(
        tasks=[
            task_service_pb2.SubmitTaskRequest(type="gate", ref="p", request_id=str(uuid7())),
            task_service_pb2.SubmitTaskRequest(
                type="ok", after_refs=["p"], request_id=str(uuid7())
            ),
        ]
    )
    sent = await stub.SubmitTasks(request)
    resent = await stub.SubmitTasks(request)
    assert [r.task.id for r in resent.results] == [r.task.id for r in sent.results]
    assert [r.deduplicated for r in resent.results] == [True, True]
    assert resent.results[1].task.state == task_pb2.TASK_STATE_BLOCKED


async def test_a_dead_dependency_cancels_or_lets_run_per_policy(
    client: AsyncClient, gates: Gates, db: asyncpg.Connection
) -> None:
    tasks = await client.submit_many(
        [
            TaskSpec(type="gate", payload="f", ref="g"),
            TaskSpec(type="fail", ref="f", after_refs=["g"]),
            TaskSpec(type="ok", payload="x", ref="x", after_refs=["f"]),
            TaskSpec(type="ok", payload="y", ref="y", after_refs=["x"]),
            TaskSpec(type="ok", payload="z", after_refs=["x"], on_dependency_failure="run"),
            TaskSpec(type="ok", payload="w", after_refs=["f"], on_dependency_failure="run"),
        ]
    )
    _, f, x, y, z, w = tasks
    gates.open("f")
    assert (await client.wait(f.id, timeout=10)).state is TaskState.DEAD
    done_x = await client.wait(x.id, timeout=10)
    assert done_x.state is TaskState.CANCELLED and f.id in (done_x.last_error or "")
    done_y = await client.wait(y.id, timeout=10)
    assert done_y.state is TaskState.CANCELLED and x.id in (done_y.last_error or "")
    assert (await client.wait(z.id, timeout=10)).state is TaskState.SUCCEEDED
    assert (await client.wait(w.id, timeout=10)).state is TaskState.SUCCEEDED
    # The cancelled ones never ran; those that ran anyway ran after the failure.
    assert await _first_start(db, x.id) is None and await _first_start(db, y.id) is None
    assert not {("start", x.id), ("start", y.id)} & set(gates.events)
    assert gates.ran_after(z.id, f.id) and gates.ran_after(w.id, f.id)

    # Dependencies finished before the submit count at the submit.
    late = await client.submit("ok", "late", after=[f])
    assert late.state is TaskState.CANCELLED
    assert f.id in ((await client.get(late.id)).last_error or "")
    runs = await client.submit("ok", "runs", after=[f, w], on_dependency_failure="run")
    assert runs.state in (TaskState.PENDING, TaskState.RUNNING)
    assert (await client.wait(runs.id, timeout=10)).state is TaskState.SUCCEEDED


async def test_cancelling_a_blocked_task_cascades(
    client: AsyncClient, gates: Gates, db: asyncpg.Connection
) -> None:
    gate = await client.submit("gate", "hold")
    d = await client.submit("ok", "d", after=[gate])
    e = await client.submit("ok", "e", after=[d])
    keep = await client.submit("ok", "keep", after=[d], on_dependency_failure="run")
    cancelled = await client.cancel(d.id)
    assert cancelled.state is TaskState.CANCELLED
    assert (await client.get(e.id)).state is TaskState.CANCELLED
    assert (await client.wait(keep.id, timeout=10)).state is TaskState.SUCCEEDED
    gates.open("hold")
    assert (await client.wait(gate.id, timeout=10)).state is TaskState.SUCCEEDED
    assert (await client.get(d.id)).state is TaskState.CANCELLED


async def test_bad_dependencies_are_refused_naming_them(
    client: AsyncClient, db: asyncpg.Connection
) -> None:
    unknown = "0190a000-0000-7000-8000-000000000001"
    with pytest.raises(TaskNotFoundError, match=unknown):
        await client.submit("ok", after=[unknown])
    # Another tenant's task is not told apart from a missing one.
    foreign = uuid.uuid4()
    await db.execute(
        """
        INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
            max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms,
            retry_multiplier, retry_jitter, create_time, update_time)
        VALUES ($1, 'other', 'default', 'ok', '', 'application/json', 1, 0, 3, now(),
            1000, 1000, 1000, 2, 0, now(), now())
        """,
        foreign,
    )
    with pytest.raises(TaskNotFoundError, match=str(foreign)):
        await client.submit("ok", after=[str(foreign)])
    with pytest.raises(InvalidArgumentError, match="not-a-uuid"):
        await client.submit("ok", after=["not-a-uuid"])
    with pytest.raises(InvalidArgumentError, match="cycle"):
        await client.submit_many(
            [
                TaskSpec(type="ok", ref="a", after_refs=["c"]),
                TaskSpec(type="ok", ref="b", after_refs=["a"]),
                TaskSpec(type="ok", ref="c", after_refs=["b"]),
            ]
        )
    with pytest.raises(InvalidArgumentError, match="nowhere"):
        await client.submit_many([TaskSpec(type="ok", after_refs=["nowhere"])])
    # Nothing of the refused submits was written.
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE tenant = 'default'") == 0


async def test_the_cli_submits_after_and_shows_what_a_task_waits_for(
    coordinator: Coordinator, client: AsyncClient
) -> None:
    # Two commands only: each is a process start (seconds on a busy machine). The list
    # filter and the cancel of a BLOCKED task are the client tests' above.
    where = ["--coordinator", coordinator.address]
    first = await client.submit("nobody-runs-this")
    second = await client.submit("nobody-runs-this")
    done = await conveyor(*where, "submit", "echo", "--after", first.id, "--after", second.id)
    assert done.code == 0, done.err
    blocked = done.out.strip()
    assert (await client.get(blocked)).state is TaskState.BLOCKED
    done = await conveyor(*where, "get", blocked)
    assert done.code == 0, done.err
    waits = ", ".join(sorted([first.id, second.id]))
    assert "state:        blocked" in done.out and f"waits for:    {waits}" in done.out


async def test_the_sweeper_releases_dependents_a_finish_did_not_see(
    coordinator: Coordinator, client: AsyncClient, db: asyncpg.Connection
) -> None:
    """A finish whose statement began before a dependent's submit committed does not see
    its edge (store/dependencies.py); the leader's sweeper releases it."""
    first = await client.submit("nobody-runs-this")
    blocked = await client.submit("nobody-runs-this", after=[first])
    # What that finish amounts to: the dependency finished, its edge still there.
    await db.execute(
        "UPDATE tasks SET state = 4, finish_time = now() WHERE id = $1", uuid.UUID(first.id)
    )
    sweeper = next(s for s in coordinator.services if s.name == "dependency-sweeper")
    sweeper.wake()

    async def released() -> bool:
        return (await client.get(blocked.id)).state is TaskState.PENDING

    await eventually(released, timeout=5, what="the dependent released by the sweeper")
    assert await db.fetchval("SELECT count(*) FROM task_edges") == 0
