"""Task dependencies across a leader SIGKILL: two coordinators against real etcd and a
worker, all separate processes.

Chains, a fan-out, a fan-in and a dead dependency with both policies are in flight when
the leader is killed while dependencies are finishing. The release of dependents is
written in the transaction that finishes their last dependency, so no kill can fall
between the two: afterwards the database must show every dependent in the state its
policy says and no task left BLOCKED or edge left behind, and the worker's log every
dependent run after its dependencies.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from cluster import CoordinatorProcess, WorkerProcess, read_effects, wait_for_leader
from etcd_servers import EtcdServer
from testsupport import eventually

from conveyor.client import AsyncClient, Task, TaskSpec

pytestmark = pytest.mark.slow

SUCCEEDED, DEAD, CANCELLED = 4, 5, 6


Expected = dict[str, tuple[list[str], int]]
"""Task id -> (its dependencies, the state it must end in)."""


async def _submit(client: AsyncClient) -> tuple[Expected, dict[str, Task]]:
    """Chains, a fan-out, a fan-in and a dead dependency; what each must end as, and the
    tasks of the dead-dependency case by name."""
    expect: Expected = {}

    def track(task: Task, after: list[Task], state: int = SUCCEEDED) -> None:
        expect[task.id] = ([t.id for t in after], state)

    for _ in range(10):  # chains: first -> second -> third
        first, second, third = await client.submit_many(
            [
                TaskSpec(type="sleep", payload=0.3, ref="a"),
                TaskSpec(type="noop", ref="b", after_refs=["a"]),
                TaskSpec(type="noop", after_refs=["b"]),
            ]
        )
        track(first, [])
        track(second, [first])
        track(third, [second])
    root = await client.submit("sleep", 0.4)
    track(root, [])
    for task in await client.submit_many([TaskSpec(type="noop", after=[root])] * 20):
        track(task, [root])  # fan-out
    leaves = await client.submit_many([TaskSpec(type="sleep", payload=0.2)] * 20)
    for leaf in leaves:
        track(leaf, [])
    track(await client.submit("noop", after=leaves), leaves)  # fan-in
    # A dead dependency (the payload is not a number; one attempt): its dependents are
    # cancelled down the chain, or run, per their policy.
    bad, x, y, z = await client.submit_many(
        [
            TaskSpec(type="sleep", payload="not a number", ref="bad", max_attempts=1),
            TaskSpec(type="noop", ref="x", after_refs=["bad"]),
            TaskSpec(type="noop", after_refs=["x"]),
            TaskSpec(type="noop", after_refs=["x"], on_dependency_failure="run"),
        ]
    )
    track(bad, [], DEAD)
    track(x, [bad], CANCELLED)
    track(y, [x], CANCELLED)
    track(z, [x])
    return expect, {"bad": bad, "x": x, "y": y}


def _problems(expect: Expected, rows: list[asyncpg.Record], effects: Path) -> list[str]:
    """Where the database and the worker's log disagree with ``expect``: a state, a
    dependent that ran before a dependency's handler completed, a cancelled dependent that
    ran.

    The order is read from the worker's log (one process appends each completed handler
    run, so its order is the order things happened): a dependent's first run must come
    after the first completed run of each dependency that ran. The database's timestamps
    cannot say it to the microsecond: ``now()`` is a transaction's start, which may precede
    the commit its statement then sees."""
    tasks = {r["id"]: r for r in rows}
    if set(tasks) != set(expect):
        return [f"tasks in the database: {sorted(tasks)}, submitted: {sorted(expect)}"]
    first: dict[str, int] = {}
    for position, (task_id, _) in enumerate(read_effects(effects)):
        first.setdefault(task_id, position)
    problems: list[str] = []
    for task_id, (after, state) in expect.items():
        row = tasks[task_id]
        if row["state"] != state:
            problems.append(f"{task_id}: state {row['state']}, expected {state} ({dict(row)})")
        if state == CANCELLED:
            if row["started"] is not None or task_id in first:
                problems.append(f"{task_id}: cancelled by a dependency, yet it ran")
            continue
        if state == SUCCEEDED and task_id not in first:
            problems.append(f"{task_id}: SUCCEEDED, yet no run of it completed")
        for dep in after:
            if dep in first and first.get(task_id, -1) < first[dep]:
                problems.append(f"{task_id} ran before its dependency {dep} completed")
    return problems


async def _wait_for(db: asyncpg.Connection, sql: str, what: str) -> None:
    async def holds() -> bool:
        return bool(await db.fetchval(sql))

    await eventually(holds, timeout=60, what=what)


async def test_dependents_run_exactly_when_they_should_across_a_leader_sigkill(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    coordinators = [
        CoordinatorProcess(database_dsn, etcd_server.endpoints, log_dir=tmp_path, name=f"c{i}")
        for i in range(2)
    ]
    addresses = ",".join(c.address for c in coordinators)
    effects = tmp_path / "effects.log"
    worker = WorkerProcess(addresses, effects, log_dir=tmp_path, concurrency=30)
    db = await asyncpg.connect(database_dsn)
    try:
        for coordinator in coordinators:
            coordinator.start()
        for coordinator in coordinators:
            await coordinator.wait_serving()
        first = await wait_for_leader(database_dsn)
        worker.start()
        async with AsyncClient(addresses, timeout=30.0) as client:
            expect, named = await _submit(client)
        # Kill the leader while the first dependencies finish and release the rest.
        await _wait_for(
            db, f"SELECT count(*) >= 5 FROM tasks WHERE state = {SUCCEEDED}", "some finished"
        )
        next(c for c in coordinators if c.address == first["address"]).kill()
        await wait_for_leader(database_dsn, newer_than=first["epoch"], timeout=30)
        await _wait_for(
            db, "SELECT count(*) = 0 FROM tasks WHERE state < 4 OR state = 7", "all finished"
        )
        rows = await db.fetch(
            """
            SELECT t.id::text AS id, t.type, t.state, t.finish_time, t.last_error, t.attempt,
                t.create_time, t.update_time,
                (SELECT min(start_time) FROM task_attempts a WHERE a.task_id = t.id) AS started
            FROM tasks t
            """
        )
        edges = await db.fetchval("SELECT count(*) FROM task_edges")
    finally:
        await db.close()
        for process in [worker, *coordinators]:
            process.close()

    problems = _problems(expect, rows, effects)
    assert not problems, "\n".join(problems[:20])
    errors = {r["id"]: r["last_error"] or "" for r in rows}
    assert named["bad"].id in errors[named["x"].id]
    assert named["x"].id in errors[named["y"].id]
    assert edges == 0
