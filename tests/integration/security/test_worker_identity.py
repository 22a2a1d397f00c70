"""What a worker says about itself (worker id, hostname, pid, the leases it lists) grants
nothing its key does not (issue 15, item 3).

A Hello that repeated a live worker's hostname and pid (which the WORKER_ID_IN_USE refusal
used to tell) retired the live session, and since it listed no leases, the running attempt
was called NOT_STARTED and dispatched again while the first worker still ran it, without
using an attempt. Only the process's resume token (from its Welcome) now proves that a
Hello comes from the process that holds the worker id and its leases.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from security import secured
from testsupport import RawWorker, coordinator_config, error_details, eventually, submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.dispatch.sessions import Eviction
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, worker_service_pb2

Workers = Callable[[], RawWorker]
NOT_STARTED = task_pb2.ATTEMPT_OUTCOME_NOT_STARTED
LEASE_EXPIRED = task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED


async def _attempts(db: asyncpg.Connection, task_id: str) -> list[tuple[int, int]]:
    rows = await db.fetch(
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = $1::uuid ORDER BY attempt",
        task_id,
    )
    return [(r["attempt"], r["outcome"]) for r in rows]


@pytest.mark.slow
async def test_a_hello_with_a_live_workers_host_and_pid_does_not_take_its_id(
    database_dsn: str, tmp_path: Path
) -> None:
    async with secured(database_dsn, tmp_path) as coordinator:
        keys, channel = coordinator.keys, coordinator.channel
        submitter = await keys.create("acme", "submit", "read")
        victim_key = await keys.create("acme", "worker")
        intruder_key = await keys.create("acme", "worker")
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        task = (
            await stub.SubmitTask(
                task_service_pb2.SubmitTaskRequest(type="echo", payload=b'"x"'),
                metadata=submitter.metadata,
            )
        ).task
        victim = RawWorker(coordinator.address)
        intruders = [RawWorker(coordinator.address) for _ in range(2)]
        try:
            await victim.connect(
                "prod-worker", hostname="prod-host", pid=7, metadata=victim_key.metadata
            )
            (assignment,) = await victim.assignments(1)

            # Repeating the holder's host and pid proves nothing (it took the session over).
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await intruders[0].connect(
                    "prod-worker", hostname="prod-host", pid=7, metadata=intruder_key.metadata
                )
            assert error_details(caught.value).reason == "WORKER_ID_IN_USE"

            # The refusal names the worker id it was asked about, and nothing of the holder
            # (it told the host and pid to repeat).
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await intruders[1].connect(
                    "prod-worker", hostname="elsewhere", pid=1, metadata=intruder_key.metadata
                )
            refused = error_details(caught.value)
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.ALREADY_EXISTS,
                "WORKER_ID_IN_USE",
            )
            assert refused.metadata == {"worker_id": "prod-worker"}
            assert "prod-host" not in refused.message and "pid" not in refused.message

            # The live worker still holds its attempt, and its result counts.
            assert (await victim.report(assignment.lease, result=b'"done"')).accepted
            got = await stub.GetTask(
                task_service_pb2.GetTaskRequest(id=task.id), metadata=submitter.metadata
            )
            assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
            assert (got.task.attempt, got.task.uncounted_attempts) == (1, 0)
            assert [a.outcome for a in got.attempts] == [task_pb2.ATTEMPT_OUTCOME_SUCCEEDED]
        finally:
            for worker in (victim, *intruders):
                await worker.close()


@pytest.mark.parametrize("lists_it", [False, True])
async def test_a_new_process_on_a_free_worker_id_calls_no_running_attempt_not_started(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Workers,
    db: asyncpg.Connection,
    lists_it: bool,
) -> None:
    """The worker's stream broke (its process may still run the task) and another process
    took the id: the running attempt goes back counted, as it may have run, never as
    NOT_STARTED; listing its lease gets the newcomer nothing."""
    task = await submit(stub, max_attempts=3)
    victim = raw_workers()
    await victim.connect("phoenix", credits=1)
    (assignment,) = await victim.assignments(1)
    await victim.close()

    newcomer = raw_workers()
    listed = (assignment.lease,) if lists_it else ()
    welcome = await newcomer.connect("phoenix", credits=0, in_flight=listed)
    assert list(welcome.lost) == list(listed)
    assert await _attempts(db, task.id) == [(1, LEASE_EXPIRED)]
    got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
    assert got.task.state == task_pb2.TASK_STATE_PENDING
    assert got.task.uncounted_attempts == 0
    ack = await newcomer.report(assignment.lease, result=b'"forged"')
    assert not ack.accepted


async def test_a_reconnect_with_its_resume_token_resumes_after_a_coordinator_restart(
    database_dsn: str, coordinator: Coordinator, db: asyncpg.Connection
) -> None:
    """The token is checked against the leases in PostgreSQL, so it holds across a restart
    (or a failover): the listed lease is kept, the unlisted one was never received."""
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        kept, unsent = await submit(stub, max_attempts=1), await submit(stub, max_attempts=1)
    worker = RawWorker(coordinator.address)
    welcome = await worker.connect("phoenix", credits=2)
    assert len(welcome.resume_token) == 32
    leases = {a.lease.task_id: a.lease for a in await worker.assignments(2)}
    await worker.close()
    await coordinator.stop(grace=1.0)

    again = Coordinator(coordinator_config(database_dsn))
    await again.start()
    worker = RawWorker(again.address)
    try:
        resumed = await worker.connect(
            "phoenix",
            credits=0,
            in_flight=(leases[kept.id],),
            resume_token=welcome.resume_token,
        )
        assert list(resumed.lost) == []
        assert resumed.resume_token == welcome.resume_token
        assert await _attempts(db, unsent.id) == [(1, NOT_STARTED)]
        assert (await worker.report(leases[kept.id])).accepted
    finally:
        await worker.close()
        await again.stop(grace=1.0)


async def test_a_reconnect_with_its_resume_token_replaces_its_live_session(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Workers,
    db: asyncpg.Connection,
) -> None:
    """A reconnect that overtook the end of its old stream retires that stream, keeps what it
    lists, and the lease it does not list was never received: not counted."""
    kept, unsent = await submit(stub), await submit(stub)
    first = raw_workers()
    welcome = await first.connect("twin", credits=2)
    leases = {a.lease.task_id: a.lease for a in await first.assignments(2)}
    again = raw_workers()
    resumed = await again.connect(
        "twin", credits=0, in_flight=(leases[kept.id],), resume_token=welcome.resume_token
    )
    assert list(resumed.lost) == []
    assert await _attempts(db, unsent.id) == [(1, NOT_STARTED)]
    assert (await again.report(leases[kept.id])).accepted


@dataclass
class _Silent:
    """A worker that fell silent with a task and was evicted, and its process's next
    stream, not yet opened."""

    coordinator: Coordinator
    stub: task_service_pb2_grpc.TaskServiceAsyncStub
    task: task_pb2.Task
    """Its task: one attempt, so once released it is dead, not offered again."""
    lease: worker_service_pb2.Lease
    resume_token: bytes
    new: RawWorker

    async def settled(self) -> Eviction:
        """The old session's eviction, once its end has settled."""

        def recorded() -> Eviction | None:
            return next(iter(self.coordinator.sessions.evictions), None)

        return await eventually(recorded, what="the evicted session's end")


@contextlib.asynccontextmanager
async def _silent_worker(database_dsn: str, entered: asyncio.Event) -> AsyncIterator[_Silent]:
    """Yields once the eviction's release has begun (``entered``: the test's gate)."""
    coordinator = Coordinator(
        coordinator_config(database_dsn, lease_duration=30.0, liveness_timeout=1.5)
    )
    await coordinator.start()
    old, new = RawWorker(coordinator.address), RawWorker(coordinator.address)
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            task = await submit(stub, max_attempts=1)
            welcome = await old.connect("gc-pause", credits=1, pulse=False)
            (lease,) = [a.lease for a in await old.assignments(1)]
            # Silent past the liveness timeout: evicted.
            await asyncio.wait_for(entered.wait(), 10)
            yield _Silent(coordinator, stub, task, lease, welcome.resume_token, new)
    finally:
        await new.close()
        await old.close()
        await coordinator.stop(grace=1.0)


async def test_an_evicted_sessions_end_releases_none_of_the_next_sessions_leases(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15's suspicion: an evicted session's end released by worker id. When its
    release ran late (the pool busy: made deterministic here by holding the release at a
    gate), a new session of the same worker had already been welcomed and given a task,
    and that task went back under it. The worker id now stays taken until the old
    session has settled, and its release takes only the leases granted to its process."""
    from conveyor.coordinator.store import tasks as store

    original = store.release_worker
    entered, gate = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        # Never longer than this: a fixed coordinator waits for this release.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await gate.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, "release_worker", held)
    async with _silent_worker(database_dsn, entered) as silent:
        # The same process comes back (its pause over), listing what it holds.
        new = silent.new
        resumed = await new.connect(
            "gc-pause", credits=1, in_flight=(silent.lease,), resume_token=silent.resume_token
        )
        second = await submit(silent.stub)
        (fresh,) = [a.lease for a in await new.assignments(1)]
        assert fresh.task_id == second.id
        gate.set()
        await silent.settled()
        # Every lease the new session holds is still its own.
        for lease in [fresh] + [silent.lease] * (silent.lease not in resumed.lost):
            assert (await new.report(lease)).accepted, lease
        got = await silent.stub.GetTask(task_service_pb2.GetTaskRequest(id=second.id))
        assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED


async def test_a_session_that_settles_too_late_leaves_its_successors_leases_alone(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnect waits only so long for the evicted session to settle
    (RETIRE_TIMEOUT, shortened here); when that session's end finally releases, the leases
    are its process's newer session's, which resumed them: it must leave them alone."""
    from conveyor.coordinator.api import worker_service
    from conveyor.coordinator.lifecycle import leases

    original = leases.Leases.release_evicted
    entered, gate = asyncio.Event(), asyncio.Event()

    async def late(self: leases.Leases, *args: Any) -> int:
        entered.set()
        await gate.wait()
        return await original(self, *args)

    monkeypatch.setattr(worker_service, "RETIRE_TIMEOUT", 0.5)
    monkeypatch.setattr(leases.Leases, "release_evicted", late)
    async with _silent_worker(database_dsn, entered) as silent:
        try:
            resumed = await silent.new.connect(
                "gc-pause", credits=0, in_flight=(silent.lease,), resume_token=silent.resume_token
            )
            assert list(resumed.lost) == []
        finally:
            gate.set()
        assert (await silent.settled()).released == 0
        assert (await silent.new.report(silent.lease)).accepted
        got = await silent.stub.GetTask(task_service_pb2.GetTaskRequest(id=silent.task.id))
        assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED


async def test_first_hellos_at_once_each_take_back_only_their_own_worker_ids_leases(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: Workers,
    db: asyncpg.Connection,
) -> None:
    """First Hellos (no resume token, no leases listed) share one group commit (issue 19):
    each still takes back exactly the running attempts of its own worker id, counted."""
    victims = [raw_workers() for _ in range(4)]
    for n, victim in enumerate(victims):
        await victim.connect(f"fleet-{n}", credits=1)
    tasks = [await submit(stub, max_attempts=3) for _ in victims]
    held = {n: (await victim.assignments(1))[0] for n, victim in enumerate(victims)}
    for victim in victims:
        await victim.close()
    # Two of the four ids come back, with two fresh ids, all at once.
    newcomers = [raw_workers() for _ in range(4)]
    ids = ["fleet-0", "fleet-2", "fresh-a", "fresh-b"]
    await asyncio.gather(*(w.connect(i, credits=0) for w, i in zip(newcomers, ids, strict=True)))
    by_task = {a.lease.task_id: n for n, a in held.items()}
    for task in tasks:
        taken_back = by_task[task.id] in (0, 2)
        attempts = await _attempts(db, task.id)
        state = await db.fetchval("SELECT state FROM tasks WHERE id = $1::uuid", task.id)
        if taken_back:
            assert (attempts, state) == ([(1, LEASE_EXPIRED)], task_pb2.TASK_STATE_PENDING)
        else:  # its worker id did not come back: still leased, until it expires
            assert (attempts, state) == ([], task_pb2.TASK_STATE_RUNNING)
