"""The one transition seam (coordinator/store/transitions.py, lifecycle/transitions.py):
every state-changing statement returns the one row shape, the state before and after
included; a fragment writes in the same statement; listeners see every committed batch."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from conveyor.coordinator.api import validation
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.lifecycle.transitions import (
    COLUMNS,
    FROM_STATE,
    RUNNING,
    STATE,
    AfterCommit,
    Cause,
    Transitions,
)
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store import transitions as shape
from conveyor.coordinator.store.sql import Query
from conveyor.v1 import task_service_pb2


def _rows(count: int, *, run_at: datetime | None = None) -> list[store.NewRow]:
    task = validation.validate_submit_one(
        task_service_pb2.SubmitTaskRequest(type="a", queue="q", max_attempts=1),
        max_payload_bytes=1 << 20,
    )
    now = datetime.now(UTC)
    state = store.SCHEDULED if run_at else store.PENDING
    return [store.NewRow("t", uuid7(), task, state, run_at or now) for _ in range(count)]


def _shape(rows: list[Any]) -> list[tuple[int, int]]:
    assert rows and all(tuple(r.keys())[: len(COLUMNS)] == COLUMNS for r in rows)
    return sorted({(r[FROM_STATE], r[STATE]) for r in rows})


async def test_every_state_change_returns_the_one_row_shape(deps: Deps) -> None:
    fence = deps.office.fence()
    now = datetime.now(UTC)
    async with deps.db.autocommit() as conn:
        inserted = await store.insert_new(conn, _rows(4), now)
        assert _shape(inserted) == [(store.UNSPECIFIED, store.PENDING)]
        claimed = await store.claim(
            conn, tenant="t", queues=["q"], types=["a"], keys=None, limit=3, max_bytes=1 << 20,
            worker_id="w", holder=b"h", lease_seconds=30, fence=fence,
        )  # fmt: skip
        assert _shape(claimed) == [(store.PENDING, RUNNING)]
        assert all(r["queue_wait_seconds"] is not None for r in claimed)
        keys = [LeaseKey("t", r["id"], r["attempt"], r["epoch"], "w") for r in claimed]
        finished = await store.finish_attempts(
            conn, [store.Outcome(keys[0], store.OUTCOME_SUCCEEDED, b"1", "", False)], fence
        )
        assert _shape(finished) == [(RUNNING, store.SUCCEEDED)]
        assert finished[0]["outcome"] == store.OUTCOME_SUCCEEDED
        assert finished[0]["run_seconds"] is not None
        assert finished[0]["end_to_end_seconds"] is not None
        failed = await store.finish_attempts(
            conn, [store.Outcome(keys[1], store.OUTCOME_FAILED, None, "boom", True)], fence
        )
        assert _shape(failed) == [(RUNNING, store.DEAD)]  # max_attempts=1
        redriven = await store.redrive(conn, "t", uuid.UUID(keys[1].task_id), fence)
        assert _shape(redriven) == [(store.DEAD, store.PENDING)]
        released = await store.release_leases(conn, keys[2:], store.EXPIRED, fence)
        assert _shape(released) == [(RUNNING, store.DEAD)]
        assert released[0]["worker_id"] == "w"
        assert released[0]["outcome"] == store.OUTCOME_LEASE_EXPIRED
        cancelled = await store.cancel(conn, "t", uuid.UUID(inserted[3]["id"]), fence)
        assert _shape(cancelled) == [(store.PENDING, store.CANCELLED)]
        assert cancelled[0]["outcome"] is None  # no attempt ended
        later = await store.insert(conn, _rows(2, run_at=now - timedelta(seconds=1)), now)
        assert _shape(later) == [(store.UNSPECIFIED, store.SCHEDULED)]
        promoted = await store.promote_due(conn, 10, fence)
        assert _shape(promoted) == [(store.SCHEDULED, store.PENDING)]


def _promote_with(fragment: shape.Fragment, monkeypatch: pytest.MonkeyPatch) -> Query:
    """A promotion of every SCHEDULED task, written with ``fragment`` as the only one."""
    monkeypatch.setattr(shape, "FRAGMENTS", (fragment,))
    return Query(
        f"promote_with_{fragment.name}",
        f"""
        WITH changed AS (
            UPDATE tasks t SET state = {store.PENDING} WHERE t.state = {store.SCHEDULED}
            RETURNING {shape.changed(from_state=store.SCHEDULED)}
        ) {shape.tail()}
        """,
    )


async def test_a_fragment_writes_in_the_same_statement_as_the_state_change(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = shape.Fragment(
        "outbox",
        "INSERT INTO seen (task_id, from_state, to_state) "
        "SELECT id, from_state, state FROM changed",
    )
    promote = _promote_with(outbox, monkeypatch)
    now = datetime.now(UTC)
    async with deps.db.autocommit() as conn:
        await conn.execute("CREATE TABLE seen (task_id uuid, from_state int, to_state int)")
        await store.insert(conn, _rows(3, run_at=now + timedelta(hours=1)), now)
        rows = await promote.fetch(conn)
        seen = await conn.fetch("SELECT task_id::text AS id, from_state, to_state FROM seen")
    assert sorted((r["id"], r["from_state"], r["state"]) for r in rows) == sorted(
        (s["id"], s["from_state"], s["to_state"]) for s in seen
    )
    assert len(seen) == 3


async def test_a_fragment_that_fails_rolls_the_state_change_back(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = shape.Fragment("bad", "INSERT INTO missing_table SELECT id FROM changed")
    promote = _promote_with(failing, monkeypatch)
    now = datetime.now(UTC)
    async with deps.db.autocommit() as conn:
        await store.insert(conn, _rows(2, run_at=now + timedelta(hours=1)), now)
        with pytest.raises(asyncpg.UndefinedTableError):
            await promote.fetch(conn)
        states = await conn.fetch("SELECT state FROM tasks")
    assert {r["state"] for r in states} == {store.SCHEDULED}


def test_listeners_see_each_batch_once_and_one_that_fails_stops_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    after_commit = AfterCommit()
    seen: list[tuple[Cause, int]] = []

    def broken(batch: Transitions) -> None:
        raise RuntimeError("a bug")

    after_commit.listen(broken)
    after_commit.listen(lambda batch: seen.append((batch.cause, len(batch.rows))))
    row = ("id", "t", "q", "a", RUNNING, store.PENDING, 1, 1, "w", None, None, *[None] * 4)
    with caplog.at_level(logging.ERROR):
        after_commit.publish(Cause.NOT_STARTED, [row, row])
        after_commit.publish(Cause.CLAIMED, [])  # nothing committed: nobody is told
    assert seen == [(Cause.NOT_STARTED, 2)]
    assert "a transition listener" in caplog.text


def test_a_batch_answers_what_listeners_ask() -> None:
    now = datetime.now(UTC)

    def row(before: int, after: int, run_at: datetime = now) -> tuple[Any, ...]:
        return ("id", "t", "q", "a", before, after, 1, 1, "w", None, run_at, *[None] * 4)

    batch = Transitions(
        Cause.FINISHED,
        [
            row(RUNNING, store.SUCCEEDED),
            row(RUNNING, store.SCHEDULED, now + timedelta(seconds=5)),
            row(RUNNING, store.SCHEDULED, now + timedelta(seconds=2)),
        ],
    )
    assert batch.entered(store.SCHEDULED) and not batch.entered(store.PENDING)
    assert batch.earliest_run_at(store.SCHEDULED) == now + timedelta(seconds=2)
    assert batch.earliest_run_at(store.PENDING) is None
    assert len(batch.left(RUNNING)) == 3 and len(batch.finished()) == 1
    claimed = Transitions(Cause.CLAIMED, [row(store.PENDING, RUNNING)])
    assert claimed.entered(RUNNING) and not claimed.left(RUNNING) and not claimed.finished()
