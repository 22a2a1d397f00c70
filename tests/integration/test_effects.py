"""Exactly-once effects (issue 18): the fencing token of an attempt, the coordinator's
idempotency ledger, the PostgreSQL ledger helper, named locks with fencing tokens, and
versioned task updates. One coordinator (in this process, short leases) serves the
module; worker and lock-holder processes are real, killed with real signals.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import lock_holder
import pytest
from cluster import SUPPORT_DIR, WorkerProcess
from google.protobuf import duration_pb2, timestamp_pb2
from processes import ManagedProcess
from testsupport import RawWorker, coordinator_config, error_details, eventually

from conveyor.client import AsyncClient, Client, EtagMismatchError
from conveyor.coordinator import Coordinator
from conveyor.v1 import (
    effects_service_pb2,
    effects_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
)
from conveyor.worker import TaskContext, Worker, fencing_token, pg_ledger
from tests.conftest import run_async

E = effects_service_pb2
T = task_service_pb2
CODE = grpc.StatusCode
LEASE = 1.0


# -- one coordinator and one effects database for the module ------------------------------


def _database(pg_dsn: str, name: str) -> str:
    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_async(lambda: execute(f'CREATE DATABASE "{name}"'))
    return pg_dsn.rsplit("/", 1)[0] + "/" + name


def _drop(pg_dsn: str, name: str) -> None:
    async def execute() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_async(execute)


@pytest.fixture(scope="module")
def dsns(pg_dsn: str) -> Iterator[tuple[str, str]]:
    """The coordinator's database and the effects database (the handlers' own)."""
    names = [f"test_{uuid.uuid4().hex[:20]}" for _ in range(2)]
    try:
        yield _database(pg_dsn, names[0]), _database(pg_dsn, names[1])
    finally:
        for name in names:
            _drop(pg_dsn, name)


@pytest.fixture(scope="module")
async def coordinator(dsns: tuple[str, str]) -> AsyncIterator[Coordinator]:
    coord = Coordinator(coordinator_config(dsns[0], lease_duration=LEASE, heartbeat_interval=0.25))
    await coord.start()
    try:
        yield coord
    finally:
        await coord.stop(grace=1.0)


@pytest.fixture(scope="module")
async def effects_db(dsns: tuple[str, str]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsns[1])
    await pg_ledger.create_tables(conn)
    await conn.execute(
        """
        CREATE TABLE effects (task_id uuid NOT NULL, attempt int NOT NULL,
            fencing_token bigint NOT NULL);
        CREATE TABLE resource (name text PRIMARY KEY, value text NOT NULL,
            fencing_token bigint NOT NULL);
        """
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def channel(coordinator: Coordinator) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(coordinator.address) as chan:
        yield chan


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), error_details(err).reason
    return CODE.OK, ""


# -- the ledger, driven by hand ----------------------------------------------------------


async def test_ledger_records_only_under_the_current_lease(
    coordinator: Coordinator, channel: grpc.aio.Channel
) -> None:
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    ledger = effects_service_pb2_grpc.LedgerServiceStub(channel)
    task = (await tasks.SubmitTask(T.SubmitTaskRequest(type="ledger-hand", queue="ledger"))).task
    first = RawWorker(coordinator.address)
    welcome = await first.connect("ledger-w", types=("ledger-hand",), queues=("ledger",))
    (assignment,) = await first.assignments(1)
    lease = assignment.lease
    token = welcome.resume_token

    got = await ledger.GetEffect(E.GetEffectRequest(task_id=task.id, key="charge"))
    assert not got.HasField("entry")
    # Another process's token proves nothing: the lease is not its to record under.
    stranger = E.RecordEffectRequest(lease=lease, resume_token=os.urandom(32), key="charge")
    assert await _code(ledger.RecordEffect(stranger)) == (
        CODE.FAILED_PRECONDITION,
        "LEASE_NOT_HELD",
    )
    record = E.RecordEffectRequest(lease=lease, resume_token=token, key="charge", result=b'"r1"')
    done = await ledger.RecordEffect(record)
    assert done.recorded and done.entry.result == b'"r1"' and done.entry.attempt == lease.attempt
    assert done.entry.fencing_token == fencing_token(lease.epoch, lease.attempt)
    # The first record of a key stands.
    again = await ledger.RecordEffect(
        E.RecordEffectRequest(lease=lease, resume_token=token, key="charge", result=b'"r2"')
    )
    assert not again.recorded and again.entry.result == b'"r1"'

    # A new process takes the worker id: the lease is taken back (counted) and the task
    # leased again, to attempt 2. Attempt 1 can no longer record; attempt 2 sees its entry.
    await first.close()
    second = RawWorker(coordinator.address)
    try:
        welcome2 = await second.connect("ledger-w", types=("ledger-hand",), queues=("ledger",))
        (retry,) = await second.assignments(1)
        assert retry.lease.task_id == task.id and retry.lease.attempt == lease.attempt + 1
        late = E.RecordEffectRequest(lease=lease, resume_token=token, key="other")
        assert await _code(ledger.RecordEffect(late)) == (
            CODE.FAILED_PRECONDITION,
            "LEASE_NOT_HELD",
        )
        seen = await ledger.GetEffect(E.GetEffectRequest(task_id=task.id, key="charge"))
        assert seen.entry.attempt == lease.attempt and seen.entry.result == b'"r1"'
        later = fencing_token(retry.lease.epoch, retry.lease.attempt)
        assert later > seen.entry.fencing_token
        current = E.RecordEffectRequest(
            lease=retry.lease, resume_token=welcome2.resume_token, key="other"
        )
        assert (await ledger.RecordEffect(current)).entry.fencing_token == later
        # Once the task finished, no attempt holds a lease.
        ack = await second.report(retry.lease)
        assert ack.accepted
        current.key = "after-finish"
        assert (await _code(ledger.RecordEffect(current)))[0] == CODE.FAILED_PRECONDITION
    finally:
        await second.close()

    # Bad input is INVALID_ARGUMENT; an unknown task NOT_FOUND.
    bad = [
        E.RecordEffectRequest(lease=lease, resume_token=token, key=""),
        E.RecordEffectRequest(lease=lease, resume_token=token, key="k\x00"),
        E.RecordEffectRequest(lease=lease, resume_token=token, key="x" * 201),
        E.RecordEffectRequest(lease=lease, resume_token=b"short", key="k"),
        E.RecordEffectRequest(lease=lease, resume_token=token, key="k", result=b"x" * 65537),
        E.RecordEffectRequest(
            lease=worker_service_pb2.Lease(task_id="nope", attempt=1, epoch=1),
            resume_token=token,
            key="k",
        ),
    ]
    for request in bad:
        assert await _code(ledger.RecordEffect(request)) == (
            CODE.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    assert (await _code(ledger.GetEffect(E.GetEffectRequest(task_id="nope", key="k"))))[
        0
    ] == CODE.INVALID_ARGUMENT
    unknown = str(uuid.uuid4())
    assert await _code(ledger.GetEffect(E.GetEffectRequest(task_id=unknown, key="k"))) == (
        CODE.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    stray = E.RecordEffectRequest(
        lease=worker_service_pb2.Lease(task_id=unknown, attempt=1, epoch=1),
        resume_token=token,
        key="k",
    )
    assert await _code(ledger.RecordEffect(stray)) == (CODE.NOT_FOUND, "TASK_NOT_FOUND")


async def test_handlers_reach_the_ledger_and_locks_through_their_context(
    coordinator: Coordinator,
) -> None:
    worker = Worker(coordinator.address, queues=["handler-tools"], grace_period=1.0)

    @worker.task("tools")
    async def tools(ctx: TaskContext, payload: Any) -> dict[str, Any]:
        async with ctx.lock("handler-lock", ttl=2) as lock:
            first = await ctx.ledger.record("step", {"lock": lock.fencing_token})
            again = await ctx.ledger.record("step", "ignored")  # the first record stands
            seen = await ctx.ledger.get("step")
            assert seen is not None and seen == again == first
            return {
                "lock": lock.fencing_token,
                "ledger": seen.result,
                "token": seen.fencing_token,
                "fencing": ctx.fencing_token,
            }

    async with worker, AsyncClient(coordinator.address) as client:
        task = await client.submit("tools", None, queue="handler-tools")
        result = await client.result(task.id, timeout=30)
    assert result["lock"] >= 1 and result["ledger"] == {"lock": result["lock"]}
    assert result["token"] == result["fencing"] == fencing_token(1, 1)


async def test_fencing_tokens_refuse_a_stale_writer(effects_db: asyncpg.Connection) -> None:
    """The example resource: a write checks its token in its own transaction."""
    older, newer = fencing_token(3, 7), fencing_token(4, 8)
    async with effects_db.transaction():
        await pg_ledger.check_fencing_token(effects_db, "doc:1", newer)
    with pytest.raises(pg_ledger.StaleFencingTokenError) as refused:
        async with effects_db.transaction():
            await pg_ledger.check_fencing_token(effects_db, "doc:1", older)
    assert refused.value.fencing_token == older
    async with effects_db.transaction():  # the same token again is the same writer
        await pg_ledger.check_fencing_token(effects_db, "doc:1", newer)
    with pytest.raises(RuntimeError, match="inside the transaction"):
        await pg_ledger.check_fencing_token(effects_db, "doc:1", newer)


# -- exactly once across SIGKILL ---------------------------------------------------------

KILL_POINTS = {
    "postgres": ("none", "before_effect", "in_transaction", "after_record"),
    # A kill between the effect and its record would repeat the effect: the gap only a
    # shared transaction closes (documented); the kill points stay outside it.
    "coordinator": ("none", "before_effect", "after_record"),
}
RUNS = 20
WORKER_ID = "effects-worker"


class ForkServer(WorkerProcess):
    """``effects_app.py`` as a fork server of worker processes (see its docstring)."""

    control: Path

    def command(self) -> list[str]:
        return [sys.executable, str(SUPPORT_DIR / "effects_app.py"), str(self.control)]


def _plan(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    ledger = rng.choice(sorted(KILL_POINTS))
    return {"ledger": ledger, "kill": rng.choice(KILL_POINTS[ledger])}


@pytest.mark.slow
async def test_each_effect_happens_once_across_sigkills(
    coordinator: Coordinator,
    channel: grpc.aio.Channel,
    effects_db: asyncpg.Connection,
    dsns: tuple[str, str],
    tmp_path: Path,
) -> None:
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    plans = {seed: _plan(seed) for seed in range(RUNS)}
    ids: dict[str, int] = {}
    for seed, plan in plans.items():
        request = T.SubmitTaskRequest(
            type="effect", queue="effects", payload=json.dumps(plan).encode(),
            content_type="application/json", max_attempts=100,
        )  # fmt: skip
        ids[(await tasks.SubmitTask(request)).task.id] = seed
    control = tmp_path / "control"
    control.mkdir()
    server = ForkServer(
        coordinator.address, tmp_path / "unused.log", log_dir=tmp_path, concurrency=RUNS,
        env={
            "CONVEYOR_TEST_EFFECTS_DSN": dsns[1], "CONVEYOR_TEST_WORKER_ID": WORKER_ID,
            "CONVEYOR_TEST_KILL_DIR": str(control),
        },
    )  # fmt: skip
    server.control = control
    server.start()

    async def unfinished() -> list[str]:
        rows = await tasks.ListTasks(T.ListTasksRequest(queue="effects", page_size=100))
        return [
            f"{t.id} state {t.state} attempt {t.attempt} {t.last_error!r}"
            for t in rows.tasks
            if t.state != 4
        ]

    lives = 0
    (control / "go-0").touch()
    deadline = asyncio.get_running_loop().time() + 60
    try:
        while left := await unfinished():
            assert asyncio.get_running_loop().time() < deadline, (left, server.log_tail())
            ended = control / f"exit-{lives}"
            if not ended.exists():
                await asyncio.sleep(0.05)
                continue
            assert int(ended.read_text()) == -signal.SIGKILL, server.log_tail()
            lives += 1
            assert lives <= RUNS, "more worker lives than tasks"
            # The dead process's session must be gone before its id connects again.
            await eventually(
                lambda: coordinator.sessions.holder("default", WORKER_ID) is None,
                what="the killed worker's session to end",
            )
            (control / f"go-{lives}").touch()
    finally:
        server.kill()

    killed = {p.name.removeprefix("kill-"): p.read_text() for p in control.glob("kill-*")}
    counts = {
        str(r["task_id"]): r["n"]
        for r in await effects_db.fetch(
            "SELECT task_id, count(*) AS n FROM effects GROUP BY task_id"
        )
    }
    for task_id, seed in ids.items():
        plan = plans[seed]
        assert counts.get(task_id) == 1, (seed, plan, counts.get(task_id))
        if plan["kill"] != "none":
            assert killed.get(task_id) == plan["kill"], (seed, plan)
        task = (await tasks.GetTask(T.GetTaskRequest(id=task_id))).task
        assert task.state == 4, (seed, task)
        if plan["kill"] == "after_record":
            # The retry found the record and skipped the effect.
            assert task.attempt >= 2 and json.loads(task.result) == "skipped", (seed, task)
    assert lives == sum(p["kill"] != "none" for p in plans.values())
    # Every effect carries its attempt's token (epoch << 32 | attempt).
    tokens = await effects_db.fetch("SELECT attempt, fencing_token FROM effects")
    assert all(r["fencing_token"] & 0xFFFFFFFF == r["attempt"] for r in tokens)


# -- locks with fencing tokens -----------------------------------------------------------


class LockHolder(ManagedProcess):
    """``lock_holder.py`` (see its docstring)."""

    def __init__(self, address: str, dsn: str, name: str, ttl: float, log_dir: Path) -> None:
        super().__init__(f"lock-holder-{name}", log_dir)
        self.args = [address, dsn, name, str(ttl)]

    def command(self) -> list[str]:
        return [sys.executable, str(SUPPORT_DIR / "lock_holder.py"), *self.args]

    def environment(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(SUPPORT_DIR), os.environ.get("PYTHONPATH")) if p)
        return {**super().environment(), "PYTHONPATH": path}


@pytest.mark.slow
async def test_a_paused_lock_holder_is_fenced_off(
    coordinator: Coordinator, effects_db: asyncpg.Connection, dsns: tuple[str, str], tmp_path: Path
) -> None:
    ttl = 0.5
    holder = LockHolder(coordinator.address, dsns[1], "export", ttl, tmp_path).start()
    try:
        first = await eventually(
            lambda: re.search(r"acquired (\d+)", holder.log_tail()),
            timeout=30,
            what="the holder to take the lock",
        )
        old = int(first.group(1))
        await eventually(
            lambda: effects_db.fetchval("SELECT fencing_token FROM resource WHERE name = 'export'"),
            what="the holder's first write",
        )
        # SIGSTOP between two of its writes: it still believes it holds the lock.
        holder.pause_at(signal.SIGUSR1)
        async with (
            AsyncClient(coordinator.address) as client,
            client.lock("export", ttl, timeout=10) as lock,
        ):
            # Taken only once the paused holder's TTL ran out, with a larger token.
            assert lock.fencing_token > old
            async with asyncio.timeout(30):  # a holder stopped mid-transaction would block it
                await lock_holder.write(effects_db, "export", "second", lock.fencing_token)
            holder.resume()
            # The paused holder wakes up and writes with its old token: refused.
            await eventually(
                lambda: f"refused {old}" in holder.log_tail(), what="the late write refused"
            )
            assert await holder.wait_exit(10) == 0
            row = await effects_db.fetchrow("SELECT * FROM resource WHERE name = 'export'")
            assert (row["value"], row["fencing_token"]) == ("second", lock.fencing_token)
    finally:
        holder.kill()


async def test_lock_tokens_grow_and_bad_input_is_refused(
    coordinator: Coordinator, channel: grpc.aio.Channel
) -> None:
    locks = effects_service_pb2_grpc.LockServiceStub(channel)
    async with AsyncClient(coordinator.address) as client:
        async with client.lock("nightly", 5) as first:
            with pytest.raises(TimeoutError):
                await client.lock("nightly", 5, timeout=0).acquire()
            await first.renew()
        async with client.lock("nightly", 5) as second:
            assert second.fencing_token == first.fencing_token + 1
        async with client.lock("nightly", 5, renew=False) as third:
            assert third.fencing_token == second.fencing_token + 1

    def blocking() -> int:  # the blocking client's twin, off this test's loop
        with Client(coordinator.address) as sync_client, sync_client.lock("nightly", 5) as lk:
            return lk.fencing_token

    assert await asyncio.to_thread(blocking) == third.fencing_token + 1
    ttl = duration_pb2.Duration(seconds=1)
    bad = [
        locks.AcquireLock(E.AcquireLockRequest(name="", ttl=ttl)),
        locks.AcquireLock(E.AcquireLockRequest(name="x\x00", ttl=ttl)),
        locks.AcquireLock(E.AcquireLockRequest(name="x")),
        locks.AcquireLock(E.AcquireLockRequest(name="x", ttl=duration_pb2.Duration(nanos=1000))),
        locks.AcquireLock(E.AcquireLockRequest(name="x", ttl=duration_pb2.Duration(seconds=7200))),
        locks.RenewLock(E.RenewLockRequest(name="x", handle=b"short", ttl=ttl)),
        locks.ReleaseLock(E.ReleaseLockRequest(name="x", handle=b"")),
    ]
    for call in bad:
        assert await _code(call) == (CODE.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    stale = E.RenewLockRequest(name="nightly", handle=os.urandom(16), ttl=ttl)
    assert await _code(locks.RenewLock(stale)) == (CODE.FAILED_PRECONDITION, "LOCK_NOT_HELD")


# -- versioned task updates --------------------------------------------------------------


async def test_update_task_is_versioned_and_one_concurrent_update_wins(
    coordinator: Coordinator, channel: grpc.aio.Channel
) -> None:
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    submitted = await tasks.SubmitTask(
        T.SubmitTaskRequest(type="update-me", queue="updates", run_at=later)
    )
    task = submitted.task
    assert task.state == 2 and task.etag == "1"
    got = (await tasks.GetTask(T.GetTaskRequest(id=task.id))).task
    assert got.etag == "1"

    changed = await tasks.UpdateTask(
        T.UpdateTaskRequest(
            id=task.id, etag="1", priority=7, max_attempts=9, update_labels=True,
            labels={"team": "billing"},
        )
    )  # fmt: skip
    updated = changed.task
    assert (updated.priority, updated.max_attempts, dict(updated.labels)) == (
        7, 9, {"team": "billing"},
    )  # fmt: skip
    assert updated.etag == "2" and updated.state == 2
    stale = T.UpdateTaskRequest(id=task.id, etag="1", priority=1)
    assert await _code(tasks.UpdateTask(stale)) == (CODE.ABORTED, "ETAG_MISMATCH")

    # Concurrent updates with the same etag, each on its own connection: exactly one wins.
    channels = [grpc.aio.insecure_channel(coordinator.address) for _ in range(6)]
    try:
        answers = await asyncio.gather(
            *(
                _code(
                    task_service_pb2_grpc.TaskServiceStub(c).UpdateTask(
                        T.UpdateTaskRequest(id=task.id, etag="2", priority=100 + i)
                    )
                )
                for i, c in enumerate(channels)
            )
        )
    finally:
        for c in channels:
            await c.close()
    assert collections.Counter(answers) == {
        (CODE.OK, ""): 1,
        (CODE.ABORTED, "ETAG_MISMATCH"): 5,
    }
    after = (await tasks.GetTask(T.GetTaskRequest(id=task.id))).task
    assert after.etag == "3" and 100 <= after.priority < 106

    # A run_at now makes it PENDING; through the client library too.
    async with AsyncClient(coordinator.address) as client:
        now_due = await client.update(task.id, etag="3", run_at=datetime.now(UTC))
        assert now_due.state.name == "PENDING" and now_due.etag == "4"
        with pytest.raises(EtagMismatchError):
            await client.update(task.id, etag="3", priority=0)

    # Once started, FAILED_PRECONDITION.
    worker = RawWorker(coordinator.address)
    try:
        await worker.connect("updates-w", types=("update-me",), queues=("updates",))
        (assignment,) = await worker.assignments(1)
        assert assignment.lease.task_id == task.id
        running = T.UpdateTaskRequest(id=task.id, priority=1)
        assert await _code(tasks.UpdateTask(running)) == (
            CODE.FAILED_PRECONDITION,
            "INVALID_STATE",
        )
    finally:
        await worker.close()

    bad = [
        T.UpdateTaskRequest(id=task.id),  # nothing to change
        T.UpdateTaskRequest(id=task.id, priority=5000),
        T.UpdateTaskRequest(id=task.id, max_attempts=0),
        T.UpdateTaskRequest(id=task.id, labels={"a": "b"}),  # without update_labels
        T.UpdateTaskRequest(id="not-a-task", priority=1),
    ]
    for request in bad:
        assert await _code(tasks.UpdateTask(request)) == (CODE.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    unknown = T.UpdateTaskRequest(id=str(uuid.uuid4()), priority=1)
    assert await _code(tasks.UpdateTask(unknown)) == (CODE.NOT_FOUND, "TASK_NOT_FOUND")
