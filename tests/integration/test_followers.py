"""Followers serve submits and reads; only dispatch needs the leader.

In-process pairs (``coordinator_pair``: the second fences the first, which follows) show
what a follower answers and that its submits wake the leader's dispatcher through
PostgreSQL NOTIFY (``lifecycle/work_ready.py``), with the dispatcher's poll set far
beyond the test's wait so that only the wake-up can dispatch in time. Separate processes
against real etcd show the point of it: a client that knows every coordinator sees no
failed submit while the leader is SIGKILLed, and every acknowledged task is in the
database and completes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cluster import Checker, CoordinatorProcess, LoadGenerator, WorkerProcess, wait_for_leader
from coordinator_pair import coordinator_pair, known_everywhere
from etcd_servers import EtcdServer
from security import Key, Keys
from testsupport import RawWorker, error_details, eventually, submit

from conveyor.client import AsyncClient
from conveyor.coordinator import Coordinator
from conveyor.coordinator.lifecycle import watch_reader
from conveyor.v1 import (
    schedule_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
)

PENDING = task_pb2.TASK_STATE_PENDING
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
NO_POLL = 60.0
"""The dispatcher's poll interval here: far past every wait of these tests."""
SUBMIT_STALL_MAX = 2.0
"""The longest a submit may take across the leader's SIGKILL (the election's TTL is 2 s):
here 0.05-0.2 s; before followers took submits, they waited out the election, 3.3 s
(and at least the TTL, so this bound still tells the two apart on a loaded machine)."""


@pytest.fixture
async def pair(database_dsn: str) -> AsyncIterator[tuple[Coordinator, Coordinator]]:
    async with coordinator_pair(database_dsn, authentication=False, poll_interval=NO_POLL) as (
        follower,
        leader,
        _,
    ):
        for coordinator in (follower, leader):
            relay = coordinator.work_ready
            assert relay is not None
            await asyncio.wait_for(relay.listening.wait(), 10)
        yield follower, leader


async def test_a_submit_to_a_follower_is_dispatched_by_the_leader_and_completes(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    follower, leader = pair
    worker = RawWorker(leader.address)
    try:
        await worker.connect("w1", credits=4, types=("echo",))
        async with grpc.aio.insecure_channel(follower.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            # Both submit calls, answered by the follower: it inserts, never hands off.
            task = await submit(stub, "echo", payload=b"one")
            assert task.state == PENDING
            batch = await stub.SubmitTasks(
                task_service_pb2.SubmitTasksRequest(
                    tasks=[task_service_pb2.SubmitTaskRequest(type="echo", payload=b"two")]
                )
            )
            ids = {task.id, batch.results[0].task.id}
            # Dispatched within seconds, though the leader's dispatcher polls once a
            # minute: the follower's NOTIFY woke it.
            assignments = await worker.assignments(2, timeout=10)
            assert {a.lease.task_id for a in assignments} == ids
            for assignment in assignments:
                ack = await worker.report(assignment.lease)
                assert ack.accepted, ack
            # Reads on the follower see what the leader wrote.
            got = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id))
            assert got.task.state == SUCCEEDED
            assert [a.outcome for a in got.attempts] == [task_pb2.ATTEMPT_OUTCOME_SUCCEEDED]
            listed = await stub.ListTasks(task_service_pb2.ListTasksRequest(state=SUCCEEDED))
            assert ids <= {t.id for t in listed.tasks}
    finally:
        await worker.close()
    relay = leader.work_ready
    assert relay is not None and relay.received >= 1


# A worker's way of opening a stream (a fresh channel, Hello written, then a read), from a
# process of its own: in the coordinator's process the write always completes first.
_CONNECT_MANY = """
import asyncio, collections, json, sys
import grpc, grpc.aio
from conveyor.v1 import worker_service_pb2 as w, worker_service_pb2_grpc as g

async def main() -> None:
    seen = collections.Counter()
    hello = w.ConnectRequest(hello=w.Hello(protocol_version=1, worker_id="w", credits=1))
    for _ in range(int(sys.argv[2])):
        async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
            call = g.WorkerServiceStub(channel).Connect(timeout=10)
            try:
                await call.write(hello)
                await call.read()
            except grpc.aio.AioRpcError:
                pass
            seen[f"{(await call.code()).name}: {await call.details()}"] += 1
    print(json.dumps(seen))

asyncio.run(main())
"""


async def test_a_follower_refuses_every_worker_stream_with_not_leader(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    # Refused before it read Hello, 5 % of the streams ended with gRPC's own INTERNAL
    # "Internal error from Core" (the worker's write raced the end), which hides
    # NOT_LEADER and the leader's address: the worker then tried the addresses in turn.
    follower, _ = pair
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CONNECT_MANY, follower.address, "1000", stdout=PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    assert json.loads(out) == {"UNAVAILABLE: this coordinator is not the leader": 1000}


async def _next(watch: Any) -> task_service_pb2.WatchTaskResponse:
    response = await asyncio.wait_for(watch.read(), 10)
    assert isinstance(response, task_service_pb2.WatchTaskResponse), response
    return response


@pytest.fixture
def no_watch_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """No refresh of watched tasks within a test (set before the coordinators start)."""
    monkeypatch.setattr(watch_reader, "WATCH_REFRESH", NO_POLL)


async def test_a_follower_watch_sees_the_leaders_changes_as_they_happen(
    no_watch_refresh: None, pair: tuple[Coordinator, Coordinator]
) -> None:
    # Only the relay of the leader's changes can tell the follower's watch that its task
    # finished.
    follower, leader = pair
    worker = RawWorker(leader.address)
    try:
        await worker.connect("w2", credits=1, types=("echo",))
        async with grpc.aio.insecure_channel(follower.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            task = await submit(stub, "echo")
            watch = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task.id))
            first = await _next(watch)
            assert first.task.id == task.id
            # A follower does not know the leader's workers: never "unserved".
            assert not first.unserved
            events = leader.events
            assert events is not None
            await eventually(lambda: events.watched("default"), what="the follower's interest")
            (assignment,) = await worker.assignments(1, timeout=10)
            await worker.report(assignment.lease)
            states = [first.task.state]
            while states[-1] != SUCCEEDED:
                response = await _next(watch)
                states.append(response.task.state)
                assert not response.unserved
    finally:
        await worker.close()


async def test_a_follower_serves_schedule_reads_and_refuses_the_rest(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    follower, leader = pair
    async with (
        grpc.aio.insecure_channel(follower.address) as far,
        grpc.aio.insecure_channel(leader.address) as near,
    ):
        on_follower = task_service_pb2_grpc.TaskServiceStub(far)
        on_leader = task_service_pb2_grpc.TaskServiceStub(near)
        await on_leader.CreateSchedule(
            schedule_pb2.CreateScheduleRequest(
                schedule=schedule_pb2.Schedule(
                    name="nightly",
                    cron="0 3 * * *",
                    task_template=schedule_pb2.TaskTemplate(type="echo"),
                )
            )
        )
        got = await on_follower.GetSchedule(schedule_pb2.GetScheduleRequest(name="nightly"))
        assert got.schedule.name == "nightly"
        listed = await on_follower.ListSchedules(schedule_pb2.ListSchedulesRequest())
        assert [s.name for s in listed.schedules] == ["nightly"]
        # Bad input is still bad input on a follower.
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await on_follower.GetTask(task_service_pb2.GetTaskRequest(id="not-a-uuid"))
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # Writes of dispatch state stay the leader's (NOT_LEADER; single-node followers
        # know no leader address to give).
        task = await submit(on_follower, "echo")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await on_follower.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(refused.value).reason == "NOT_LEADER"
        cancelled = await on_leader.CancelTask(task_service_pb2.CancelTaskRequest(id=task.id))
        assert cancelled.task.state == task_pb2.TASK_STATE_CANCELLED


async def test_a_follower_applies_keys_validation_quotas_and_idempotency(
    database_dsn: str,
) -> None:
    # Every tenant may have 3 unfinished tasks; nothing runs them (no worker).
    async with (
        coordinator_pair(database_dsn, max_backlog=3, poll_interval=NO_POLL) as (
            follower,
            leader,
            admin_key,
        ),
        grpc.aio.insecure_channel(follower.address) as far,
        grpc.aio.insecure_channel(leader.address) as near,
    ):
        keys = Keys(near, admin_key)
        acme = await keys.create("acme", "submit", "read")
        reader = await keys.create("acme", "read")
        other = await keys.create("other", "submit", "read")
        await known_everywhere((follower, leader), acme.id, reader.id, other.id)
        on_follower = task_service_pb2_grpc.TaskServiceStub(far)
        on_leader = task_service_pb2_grpc.TaskServiceStub(near)

        async def refused(key: Key | None, **fields: Any) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(on_follower, "echo", **fields) if key is None else (
                    await on_follower.SubmitTask(
                        task_service_pb2.SubmitTaskRequest(type="echo", **fields),
                        metadata=key.metadata,
                    )
                )
            return caught.value.code()

        assert await refused(None) is grpc.StatusCode.UNAUTHENTICATED
        assert await refused(reader) is grpc.StatusCode.PERMISSION_DENIED
        assert await refused(acme, queue="no spaces") is grpc.StatusCode.INVALID_ARGUMENT
        # One idempotency key through both coordinators: one task.
        keyed = task_service_pb2.SubmitTaskRequest(type="echo", idempotency_key="once")
        first = await on_follower.SubmitTask(keyed, metadata=acme.metadata)
        again = await on_leader.SubmitTask(keyed, metadata=acme.metadata)
        assert (again.task.id, again.deduplicated) == (first.task.id, True)
        # The backlog limit holds on the follower (its counter runs there too; the
        # estimate errs high, so it may refuse before the third task).
        codes = []
        for _ in range(3):
            try:
                await on_follower.SubmitTask(
                    task_service_pb2.SubmitTaskRequest(type="echo"), metadata=acme.metadata
                )
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        listed = await on_follower.ListTasks(
            task_service_pb2.ListTasksRequest(), metadata=acme.metadata
        )
        assert 1 <= len(listed.tasks) <= 3
        # A tenant reads only its own tasks, on a follower too.
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await on_follower.GetTask(
                task_service_pb2.GetTaskRequest(id=first.task.id), metadata=other.metadata
            )
        assert hidden.value.code() is grpc.StatusCode.NOT_FOUND


def _without_workers(queue: Any) -> Any:
    """A copy of a ListQueues queue with its worker count zeroed (only a leader counts)."""
    copy = type(queue)()
    copy.CopyFrom(queue)
    copy.workers = 0
    return copy


async def test_a_follower_lists_queues_from_postgresql_and_says_it_left_out_the_workers(
    database_dsn: str,
) -> None:
    # Breakers open after 2 failures in 2 attempts and stay open: the leader's memory,
    # which it writes to circuit_breakers; the follower reads that table.
    async with coordinator_pair(
        database_dsn,
        authentication=False,
        breaker_failure_rate=0.5,
        breaker_min_requests=2,
        breaker_cooldown=600.0,
    ) as (follower, leader, _):
        worker = RawWorker(leader.address)
        try:
            async with (
                grpc.aio.insecure_channel(follower.address) as far,
                grpc.aio.insecure_channel(leader.address) as near,
            ):
                on_follower = task_service_pb2_grpc.TaskServiceStub(far)
                on_leader = task_service_pb2_grpc.TaskServiceStub(near)
                await on_leader.PauseQueue(task_service_pb2.PauseQueueRequest(queue="held"))
                await on_leader.SetRateLimit(
                    task_service_pb2.SetRateLimitRequest(
                        limit=task_pb2.RateLimit(type="echo", rate=1000.0)
                    )
                )
                # Slots to spare after the failures, so the dispatcher keeps stepping (and
                # writing its breakers) with a type the breaker leaves it.
                await worker.connect("w-queues", credits=4, types=("flaky", "other"))
                for _ in range(2):
                    await submit(on_follower, "flaky")
                await submit(on_follower, "echo")
                await submit(on_follower, "echo", queue="held")
                for assignment in await worker.assignments(2, timeout=10):
                    await worker.report(
                        assignment.lease, worker_service_pb2.TASK_OUTCOME_FAILED, error="down"
                    )

                async def breakers(stub: Any) -> list[tuple[str, int, float]]:
                    reply = await stub.ListQueues(task_service_pb2.ListQueuesRequest())
                    return [
                        (b.type, b.state, b.opened_time.ToNanoseconds())
                        for b in reply.circuit_breakers
                    ]

                opened = await eventually(
                    lambda: breakers(on_leader), timeout=10, what="the leader's breaker"
                )
                assert [(t, s) for t, s, _ in opened] == [
                    ("flaky", task_pb2.CIRCUIT_BREAKER_STATE_OPEN)
                ]
                # Written within a second of opening; then the follower shows the same.
                await eventually(
                    lambda: _equal(breakers(on_follower), opened),
                    timeout=10,
                    what="the breaker on the follower",
                )

                async def read_both() -> tuple[Any, Any] | None:
                    leader_reply = await on_leader.ListQueues(task_service_pb2.ListQueuesRequest())
                    follower_reply = await on_follower.ListQueues(
                        task_service_pb2.ListQueuesRequest()
                    )
                    # Everything but the workers is PostgreSQL's, the same from both once
                    # both read the same moment (a failed task's retry may come due
                    # between the two reads: then they are read again).
                    near = {q.name: _without_workers(q) for q in leader_reply.queues}
                    far = {q.name: q for q in follower_reply.queues}
                    return (leader_reply, follower_reply) if near == far else None

                from_leader, from_follower = await eventually(
                    read_both, timeout=10, what="the same queues from both"
                )
                assert not from_leader.workers_omitted
                assert from_follower.workers_omitted
                near_queues = {q.name: q for q in from_leader.queues}
                far_queues = {q.name: q for q in from_follower.queues}
                assert near_queues["default"].workers == 1
                assert far_queues["default"].workers == 0
                assert far_queues["held"].paused and far_queues["held"].pending == 1
                assert [(r.type, r.rate) for r in far_queues["default"].rate_limits] == [
                    ("echo", 1000.0)
                ]
                # The workers only the leader knows: a follower sends the caller there.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await on_follower.ListQueues(
                        task_service_pb2.ListQueuesRequest(with_workers=True)
                    )
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert error_details(refused.value).reason == "NOT_LEADER"
                counted = await on_leader.ListQueues(
                    task_service_pb2.ListQueuesRequest(with_workers=True)
                )
                assert {q.name: q.workers for q in counted.queues}["default"] == 1
                # The other reads of PostgreSQL alone.
                limits = await on_follower.ListRateLimits(task_service_pb2.ListRateLimitsRequest())
                assert [(x.type, x.rate) for x in limits.limits] == [("echo", 1000.0)]
                dead = await on_follower.ListDeadTasks(task_service_pb2.ListDeadTasksRequest())
                assert (
                    dead.tasks
                    == (
                        await on_leader.ListDeadTasks(task_service_pb2.ListDeadTasksRequest())
                    ).tasks
                )
                await on_follower.ListDeadTaskGroups(task_service_pb2.ListDeadTaskGroupsRequest())
        finally:
            await worker.close()


async def _equal(value: Any, expected: object) -> bool:
    return bool(await value == expected)


# -- separate processes: the leader SIGKILLed under a submit load -------------------------


def _coordinators(dsn: str, etcd: EtcdServer, log_dir: Path, name: str) -> list[CoordinatorProcess]:
    """Three coordinator processes on one database and etcd (not started)."""
    return [
        CoordinatorProcess(dsn, etcd.endpoints, log_dir=log_dir, name=f"{name}{i}")
        for i in range(3)
    ]


async def _serving(coordinators: list[CoordinatorProcess]) -> None:
    """Starts them all, then waits until each serves."""
    for coordinator in coordinators:
        coordinator.start()
    for coordinator in coordinators:
        await coordinator.wait_serving()


async def test_no_submit_fails_while_the_leader_is_sigkilled(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    coordinators = _coordinators(database_dsn, etcd_server, tmp_path, "c")
    effects = tmp_path / "effects.log"
    workers: list[WorkerProcess] = []
    try:
        await _serving(coordinators)
        first = await wait_for_leader(database_dsn)
        addresses = ",".join(c.address for c in coordinators)
        workers.append(WorkerProcess(addresses, effects, log_dir=tmp_path, concurrency=50).start())
        # The client's own failover only: a submit that raises counts as failed (the
        # load generator's own retries would hide it).
        load = LoadGenerator(addresses, count=900, rate=150, give_up_after=0.0)
        load.start()
        await load.wait_acknowledged(200)
        next(c for c in coordinators if c.address == first["address"]).kill()
        await wait_for_leader(database_dsn, newer_than=first["epoch"], timeout=30)
        log = await load.wait(timeout=120)
        assert not log.failed, list(log.failed.items())[:5]
        assert not log.errors, log.errors
        assert len(log.acknowledged) == log.count
        # Nor a submit held up by the election: the next coordinator answered it.
        assert log.slowest < SUBMIT_STALL_MAX, log.slowest
        violations = await Checker(log, effects).check(database_dsn, wait_settled=60)
        assert not violations, "\n".join(violations[:20])
    finally:
        for process in [*workers, *coordinators]:
            process.close()


async def test_a_client_spreads_submits_and_reads_and_none_fails_while_the_leader_is_sigkilled(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    coordinators = _coordinators(database_dsn, etcd_server, tmp_path, "s")
    try:
        await _serving(coordinators)
        first = await wait_for_leader(database_dsn)
        addresses = [c.address for c in coordinators]
        # The client's own failover only: any call that raises fails the test.
        async with AsyncClient(addresses, timeout=30.0) as client:
            answers = client._conn.answers
            acknowledged: list[str] = []

            async def traffic(calls: int) -> None:
                for n in range(calls):
                    task = await client.submit("echo", n)
                    acknowledged.append(task.id)
                    assert (await client.get(task.id)).id == task.id

            await traffic(60)
            # 120 calls taking turns over three connected coordinators (the first few
            # went to the first while the others connected).
            assert sorted(answers) == sorted(addresses)
            assert min(answers.values()) >= 20, answers
            before = dict(answers)
            # A leader-only call still finds the leader, wherever the list starts.
            counted = await client.queues()
            assert client._conn.book.current == first["address"], counted
            load = asyncio.create_task(traffic(150))
            await eventually(lambda: len(acknowledged) >= 100 or load.done(), what="traffic")
            leader = next(c for c in coordinators if c.address == first["address"])
            leader.kill()
            await wait_for_leader(database_dsn, newer_than=first["epoch"], timeout=30)
            await asyncio.wait_for(load, 120)
            # Both survivors kept answering after the kill.
            after = {a: answers[a] - before.get(a, 0) for a in addresses}
            survivors = [a for a in addresses if a != first["address"]]
            assert all(after[a] >= 50 for a in survivors), after
        # Every acknowledged submit is committed, once.
        db = await asyncpg.connect(database_dsn)
        try:
            found = await db.fetchval(
                "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[])", acknowledged
            )
        finally:
            await db.close()
        assert found == len(acknowledged) == len(set(acknowledged)) == 210
    finally:
        for process in coordinators:
            process.close()
