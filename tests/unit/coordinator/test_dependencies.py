"""Task dependencies, the parts below the API: what validation accepts (refs, cycles, ids,
the fingerprint), how the after-commit path splits the dependents a statement moved from
the statement's own rows, and the release under concurrent finishes (store functions on
a real database)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from testsupport import eventually

from conveyor.coordinator.api import validation
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import InvalidArgument
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.lifecycle import results
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.lifecycle.transitions import COLUMNS, AfterCommit, Cause, Transitions
from conveyor.coordinator.store import dependencies
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.dependencies import Edge
from conveyor.v1 import task_pb2, task_service_pb2

BLOCKED = task_pb2.TASK_STATE_BLOCKED
PENDING = task_pb2.TASK_STATE_PENDING
RUNNING = task_pb2.TASK_STATE_RUNNING
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
CANCELLED = task_pb2.TASK_STATE_CANCELLED


def _batch(*tasks: dict[str, Any]) -> list[validation.NewTask]:
    request = task_service_pb2.SubmitTasksRequest(
        tasks=[task_service_pb2.SubmitTaskRequest(type="t", **t) for t in tasks]
    )
    return asyncio.run(validation.validate_submit_batch(request, max_payload_bytes=1000))


def test_a_dag_may_refer_forward_and_fan_in() -> None:
    tasks = _batch(
        {"ref": "sink", "after_refs": ["a", "b"]},
        {"ref": "a", "after_refs": ["root"]},
        {"ref": "b", "after_refs": ["root", "root"]},
        {"ref": "root"},
    )
    assert tasks[0].after_refs == ("a", "b") and tasks[2].after_refs == ("root",)
    assert all(t.request_hash for t in tasks[:3])  # fingerprinted without a key


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([{"ref": "a", "after_refs": ["a"]}], "cycle (a -> a)"),
        ([{"ref": "a", "after_refs": ["b"]}, {"ref": "b", "after_refs": ["a"]}], "cycle"),
        ([{"ref": "a"}, {"ref": "a"}], "tasks[1].ref: 'a' is also tasks[0]'s ref"),
        ([{"after_refs": ["gone"]}], "tasks[0].after_refs: 'gone' is not the ref"),
        ([{"after": ["nope"]}], "tasks[0].after: 'nope' is not a task id"),
        ([{"after": ["0190a000-0000-7000-8000-000000000001"], "dependency_policy": 9}], "9"),
    ],
)
def test_bad_dags_are_invalid_arguments(tasks: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _batch(*tasks)
    assert message in caught.value.message


def test_after_refs_need_a_batch_and_after_ids_repeat_once() -> None:
    with pytest.raises(InvalidArgument, match="use after"):
        validation.validate_submit_one(
            task_service_pb2.SubmitTaskRequest(type="t", after_refs=["x"]), max_payload_bytes=10
        )
    dep = "0190A000-0000-7000-8000-000000000001"
    task = validation.validate_submit_one(
        task_service_pb2.SubmitTaskRequest(
            type="t", after=[dep, dep.lower()], dependency_policy=task_pb2.DEPENDENCY_POLICY_RUN
        ),
        max_payload_bytes=10,
    )
    assert task.after == (dep.lower(),) and task.run_on_failure


def test_dependencies_are_part_of_the_fingerprint_and_absent_ones_change_nothing() -> None:
    (plain,) = _batch({"idempotency_key": "k"})
    (waiting,) = _batch({"idempotency_key": "k", "after": ["0190a000-0000-7000-8000-000000000001"]})
    assert plain.request_hash != waiting.request_hash
    # Without dependencies, the fingerprint is the one stored before they existed.
    assert plain.request_hash == validation.request_fingerprint(
        dataclasses.replace(plain, request_hash=b"")
    )
    assert waiting.request_hash != validation.request_fingerprint(
        dataclasses.replace(waiting, request_hash=b"", run_on_failure=True)
    )


def _row(task_id: str, from_state: int, state: int) -> tuple[Any, ...]:
    row: list[Any] = [None] * len(COLUMNS)
    row[COLUMNS.index("id")], row[COLUMNS.index("from_state")] = task_id, from_state
    row[COLUMNS.index("state")] = state
    return tuple(row)


def test_the_dependents_a_statement_moved_are_a_batch_of_their_own() -> None:
    after_commit = AfterCommit()
    seen: list[Transitions] = []
    after_commit.listen(seen.append)
    after_commit.publish(
        Cause.FINISHED,
        [
            _row("a", RUNNING, SUCCEEDED),
            _row("b", BLOCKED, PENDING),
            _row("c", BLOCKED, CANCELLED),
        ],
    )
    assert [(b.cause, list(b.ids())) for b in seen] == [
        (Cause.FINISHED, ["a"]),
        (Cause.RELEASED, ["b", "c"]),
    ]
    assert seen[1].entered(PENDING) and seen[1].entered(CANCELLED)
    seen.clear()
    # A cancel's own row may have been BLOCKED: it stays the cancel's.
    after_commit.publish(
        Cause.CANCELLED, [_row("d", BLOCKED, CANCELLED), _row("e", BLOCKED, CANCELLED)]
    )
    assert [(b.cause, list(b.ids())) for b in seen] == [
        (Cause.CANCELLED, ["d"]),
        (Cause.RELEASED, ["e"]),
    ]
    seen.clear()
    after_commit.publish(Cause.RELEASED, [_row("f", BLOCKED, PENDING)])
    assert [(b.cause, list(b.ids())) for b in seen] == [(Cause.RELEASED, ["f"])]


async def test_two_dependencies_finishing_in_concurrent_transactions_release_once(
    deps: Deps,
) -> None:
    """The counter on the dependent's row: the second finish waits for the first's lock
    and decrements what the first left, so the dependent is released (a count of edges
    read from each statement's snapshot would see the other's edge and release none)."""
    fence = deps.office.fence()
    now = datetime.now(UTC)
    task = validation.validate_submit_one(
        task_service_pb2.SubmitTaskRequest(type="a", queue="q"), max_payload_bytes=100
    )
    a, b, d = (str(uuid7()) for _ in range(3))
    async with deps.db.write() as conn:
        await store.insert_new(
            conn,
            [
                store.NewRow("t", a, task, store.PENDING, now),
                store.NewRow("t", b, task, store.PENDING, now),
                store.NewRow("t", d, task, store.BLOCKED, now),
            ],
            now,
        )
        await dependencies.insert_edges(conn, [Edge(d, a, "t", True), Edge(d, b, "t", True)])
        claimed = await store.claim(
            conn, tenant="t", queues=["q"], types=["a"], keys=None, limit=2, max_bytes=1 << 20,
            worker_id="w", holder=b"h", lease_seconds=30, fence=fence,
        )  # fmt: skip
    keys = {r["id"]: LeaseKey("t", r["id"], r["attempt"], r["epoch"], "w") for r in claimed}

    def done(task_id: str) -> list[store.Outcome]:
        return [store.Outcome(keys[task_id], store.OUTCOME_SUCCEEDED, b"", "", False)]

    async with deps.db.write() as first:
        assert (await store.finish_attempts(first, done(a), fence))[-1]["id"] == a
        # The second finish runs in its own transaction and waits for the first's lock
        # on the dependent until the first commits.
        second = asyncio.create_task(_finish_apart(deps, done(b), fence))

        async def waiting() -> bool:
            async with deps.db.autocommit() as conn:
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            return bool(n)

        await eventually(waiting, timeout=10, what="the second finish waiting for the lock")
        assert not second.done()
    rows = await second
    assert [(r["id"], r["from_state"], r["state"]) for r in rows][-1] == (d, BLOCKED, PENDING)
    async with deps.db.autocommit() as conn:
        left = await conn.fetchrow("SELECT state, deps_left FROM tasks WHERE id = $1::uuid", d)
        assert (left["state"], left["deps_left"]) == (PENDING, 0)
        assert await conn.fetchval("SELECT count(*) FROM task_edges") == 0


async def _finish_apart(deps: Deps, outcomes: list[store.Outcome], fence: Any) -> list[Any]:
    async with deps.db.write() as conn:
        return await store.finish_attempts(conn, outcomes, fence)


async def test_a_result_batch_releases_the_dependents_of_its_tasks_and_only_theirs(
    deps: Deps,
) -> None:
    """Results go through the statement without the release first (finish_attempts_plain):
    a task with a dependent is left to the full statement, which releases the dependent;
    a stale result is refused by both."""
    fence = deps.office.fence()
    now = datetime.now(UTC)
    task = validation.validate_submit_one(
        task_service_pb2.SubmitTaskRequest(type="a", queue="q"), max_payload_bytes=100
    )
    a, b, d = (str(uuid7()) for _ in range(3))
    async with deps.db.write() as conn:
        await store.insert_new(
            conn,
            [
                store.NewRow("t", a, task, store.PENDING, now),
                store.NewRow("t", b, task, store.PENDING, now),
                store.NewRow("t", d, task, store.BLOCKED, now),
            ],
            now,
        )
        await dependencies.insert_edges(conn, [Edge(d, a, "t", True)])
        claimed = await store.claim(
            conn, tenant="t", queues=["q"], types=["a"], keys=None, limit=2, max_bytes=1 << 20,
            worker_id="w", holder=b"h", lease_seconds=30, fence=fence,
        )  # fmt: skip
    keys = {r["id"]: LeaseKey("t", r["id"], r["attempt"], r["epoch"], "w") for r in claimed}
    done = {i: store.Outcome(keys[i], store.OUTCOME_SUCCEEDED, b"", "", False) for i in (a, b)}
    stale = store.Outcome(keys[b]._replace(attempt=7), store.OUTCOME_SUCCEEDED, b"", "", False)

    async with deps.db.autocommit() as conn:
        plain = await store.finish_attempts_plain(conn, [done[a], done[b]], fence)
    assert [r["id"] for r in plain] == [b]  # a has a dependent: not this statement's

    published: list[Transitions] = []
    deps.after_commit.listen(published.append)
    recorder = results.ResultRecorder(deps)
    answers = await recorder._flush_results([[stale, done[a]], [done[b]]])
    assert answers == [[False, True], [False]]  # b was finished above: its lease is gone
    async with deps.db.autocommit() as conn:
        states = dict(await conn.fetch("SELECT id::text, state FROM tasks"))
        refused = await conn.fetchval("SELECT count(*) FROM refused_results")
    assert states == {a: SUCCEEDED, b: SUCCEEDED, d: PENDING}
    assert refused == 2
    moved = [(r[0], r[5]) for batch in published for r in batch.rows]
    assert (a, SUCCEEDED) in moved and (d, PENDING) in moved
