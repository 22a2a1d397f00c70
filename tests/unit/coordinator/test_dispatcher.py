"""The dispatcher against a real PostgreSQL, with in-memory sessions (no gRPC): credit
accounting, claims bounded by bytes, a failed claim that costs the others nothing, and
claimed tasks that could not be sent going back without using an attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from conveyor.coordinator.api import validation
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch.policy import MAX_CLAIM_BYTES, Claim, DispatchPolicy
from conveyor.coordinator.dispatch.sessions import WorkerSession
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.lifecycle.leases import SAMPLED_KIND_SESSIONS, Dispatcher, Leases
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.sql import Fence
from conveyor.v1 import task_service_pb2


async def _insert(deps: Deps, count: int, *, queue: str = "q", payload: bytes = b"{}") -> None:
    task = validation.validate_submit_one(
        task_service_pb2.SubmitTaskRequest(type="a", queue=queue, payload=payload),
        max_payload_bytes=2 << 20,
    )
    now = datetime.now(UTC)
    rows = [store.NewRow("default", uuid7(), task, store.PENDING, now) for _ in range(count)]
    async with deps.db.read() as conn:
        await store.insert(conn, rows, now)


def _session(name: str, credit: int, queue: str = "q") -> WorkerSession:
    return WorkerSession(
        session_id=name,
        worker_id=name,
        tenant="default",
        queues=(queue,),
        task_types=("a",),
        credit=credit,
    )


def _queued(session: WorkerSession) -> int:
    return len(session.take_undelivered())


async def _running(deps: Deps) -> dict[str, int]:
    async with deps.db.read() as conn:
        rows = await conn.fetch(
            "SELECT worker_id, count(*) AS n FROM tasks WHERE state = 3 GROUP BY worker_id"
        )
    return {r["worker_id"]: r["n"] for r in rows}


class FailingSecondClaim(DispatchPolicy):
    """The store refuses the second claim of a round."""

    def __init__(self) -> None:
        super().__init__(lease_seconds=30, max_payload_bytes=1 << 20)
        self.claims = 0
        self.order: list[str] = []

    async def claim(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        fence: Fence,
        *,
        plain: asyncpg.Connection | None = None,
    ) -> Any:
        self.claims += 1
        self.order.append(claim.session.worker_id)
        if self.claims == 2:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return await super().claim(conn, claim, fence, plain=plain)


async def test_one_failed_claim_loses_no_other_claim_and_leaks_no_credit(deps: Deps) -> None:
    for queue in ("q1", "q2", "q3"):
        await _insert(deps, 4, queue=queue)
    sessions = {f"w{n}": _session(f"w{n}", 5, queue=f"q{n}") for n in (1, 2, 3)}
    for session in sessions.values():
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    policy = FailingSecondClaim()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    with pytest.raises(asyncpg.exceptions.DeadlockDetectedError):
        await dispatcher.step()
    first, failed, *_ = policy.order
    # What committed before the failure was pushed; the failed claim gave its credit back.
    assert (sessions[first].credit, _queued(sessions[first])) == (1, 4)
    assert (sessions[failed].credit, _queued(sessions[failed])) == (5, 0)
    assert await _running(deps) == {first: 4}
    # The next round serves the rest.
    policy.claims = 10
    await dispatcher.step()
    assert set(await _running(deps)) == set(sessions)
    assert all(s.credit == 1 for s in sessions.values())


async def test_a_claim_is_cut_at_the_byte_budget_and_the_round_goes_on(deps: Deps) -> None:
    await _insert(deps, 20, payload=b"x" * (1 << 20))
    session = _session("big", 100)
    deps.sessions.reserve(session)
    deps.sessions.activate(session)
    policy = DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20)
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    delay = await dispatcher.step()
    claimed = 100 - session.credit
    assert claimed == MAX_CLAIM_BYTES // (1 << 20)
    assert delay == 0.0  # more may be waiting: the next round follows at once
    await dispatcher.step()
    assert 100 - session.credit == 20


async def test_tasks_claimed_for_a_session_that_ended_go_back_uncounted(deps: Deps) -> None:
    await _insert(deps, 3)
    session = _session("gone", 3)
    policy = DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20)
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    async with deps.db.read() as conn:
        rows = await policy.claim(conn, Claim(session, 3, MAX_CLAIM_BYTES), deps.office.fence())
        assert len(rows) == 3
        session.end("the stream broke")
        await dispatcher.deliver(conn, session, policy.pack(rows))
        tasks = await conn.fetch("SELECT state, attempt, attempt_base FROM tasks")
        attempts = await conn.fetch("SELECT outcome, error FROM task_attempts")
    assert [tuple(t) for t in tasks] == [(store.PENDING, 1, 1)] * 3
    assert {a["outcome"] for a in attempts} == {store.OUTCOME_NOT_STARTED}
    assert "never started" in attempts[0]["error"]


async def test_credit_reserved_for_a_claim_comes_back_when_it_finds_less(deps: Deps) -> None:
    await _insert(deps, 2)
    session = _session("w", 10)
    deps.sessions.reserve(session)
    deps.sessions.activate(session)
    dispatcher = Dispatcher(
        deps, DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20), Leases(deps)
    )
    await asyncio.wait_for(dispatcher.step(), 10)
    assert session.credit == 8 and session.starving
    assert _queued(session) == 2


class SlowClaim(DispatchPolicy):
    """A claim that lets the test cancel the step while its statement has run."""

    def __init__(self) -> None:
        super().__init__(lease_seconds=30, max_payload_bytes=1 << 20)
        self.claimed = asyncio.Event()
        self.go_on = asyncio.Event()

    async def claim(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        fence: Fence,
        *,
        plain: asyncpg.Connection | None = None,
    ) -> Any:
        rows = await super().claim(
            conn, claim, fence, plain=plain
        )  # committed: the tasks are leased
        self.claimed.set()
        await self.go_on.wait()
        return rows


async def test_a_step_stopped_during_its_claim_delivers_what_the_claim_leased(deps: Deps) -> None:
    await _insert(deps, 3)
    session = _session("w", 5)
    deps.sessions.reserve(session)
    deps.sessions.activate(session)
    policy = SlowClaim()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    step = asyncio.create_task(dispatcher.step())
    await asyncio.wait_for(policy.claimed.wait(), 10)
    step.cancel()  # as Service.stop does when a term ends (the claim still waits)
    policy.go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(step, 10)
    # The leased tasks went to their session (not left to wait out their lease), and the
    # credit they took is spent, not lost.
    assert _queued(session) == 3
    assert session.credit == 2
    assert await _running(deps) == {"w": 3}


class CountingClaims(DispatchPolicy):
    """Records whom each claim of a round was for."""

    def __init__(self) -> None:
        super().__init__(lease_seconds=30, max_payload_bytes=1 << 20)
        self.order: list[str] = []

    async def claim(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        fence: Fence,
        *,
        plain: asyncpg.Connection | None = None,
    ) -> Any:
        self.order.append(claim.session.worker_id)
        return await super().claim(conn, claim, fence, plain=plain)


async def test_a_round_stops_claiming_for_a_kind_of_session_once_its_work_ran_out(
    deps: Deps,
) -> None:
    # Issue 19: a round ran one claim per idle session, so with thousands of idle workers
    # every round took seconds. Sessions of one kind (tenant, queues, types, keys) are
    # offered the same tasks: after a claim that found less than it asked for, the others
    # of its kind are skipped (and starving, so a fresh submit is handed to them).
    await _insert(deps, 3)
    await _insert(deps, 1, queue="other")
    same = [_session(f"w{n}", 2) for n in range(5)]
    apart = _session("apart", 2, queue="other")
    for session in (*same, apart):
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    policy = CountingClaims()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    await dispatcher.step()
    # Two claims of the kind (the first filled its portion of 2, the second found 1 of 2),
    # none for the other three of it; the session of another kind was claimed for.
    assert len(policy.order) == 3 and "apart" in policy.order
    running = await _running(deps)
    assert sum(running.values()) == 4 and running["apart"] == 1
    assert sum(_queued(s) for s in same) == 3
    skipped = [s for s in same if s.worker_id not in policy.order]
    assert len(skipped) == 3
    assert all(s.starving and s.credit == 2 for s in skipped)
    # Work that arrives later is claimed for them in the next round.
    await _insert(deps, 4)
    policy.order.clear()
    await dispatcher.step()
    assert sum((await _running(deps)).values()) == 8


async def test_credit_from_a_kind_with_nothing_left_runs_no_round_until_work_may_be_ready(
    deps: Deps,
) -> None:
    # Issue 19: each result's credit ran a round over every session. A session offered
    # (connected, or granted credit) runs a round unless the last round found nothing left
    # for its kind and nothing woke the dispatcher since.
    first, second = _session("w1", 1), _session("w2", 0)
    apart = _session("apart", 1, queue="other")
    for session in (first, second, apart):
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    dispatcher = Dispatcher(
        deps, DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20), Leases(deps)
    )
    woken = dispatcher._wakeup
    await dispatcher.step()  # nothing ready: every kind drained
    woken.clear()
    second.credit = 1
    dispatcher.offer(second)
    assert not woken.is_set() and second.starving
    dispatcher.offer(_session("new-kind", 1, queue="third"))
    assert woken.is_set()  # a kind the round did not see
    woken.clear()
    # Work became ready (an after-commit wake): the next offer runs a round, which claims.
    await _insert(deps, 1)
    dispatcher.wake()
    await dispatcher.step()
    woken.clear()
    assert sum((await _running(deps)).values()) == 1
    dispatcher.wake()
    woken.clear()
    dispatcher.offer(second)
    assert woken.is_set()


async def test_credit_after_a_full_claim_runs_a_round(deps: Deps) -> None:
    # A claim that filled its portion may have left more waiting: the session's next
    # credit runs a round without waiting for a wake.
    await _insert(deps, 5)
    session = _session("w", 2)
    deps.sessions.reserve(session)
    deps.sessions.activate(session)
    dispatcher = Dispatcher(
        deps, DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20), Leases(deps)
    )
    await dispatcher.step()
    assert not session.starving  # full: more may be waiting
    session.credit += 2
    dispatcher._wakeup.clear()
    dispatcher.offer(session)
    assert dispatcher._wakeup.is_set()


async def test_a_round_claims_once_for_a_kind_it_finds_drained_and_marks_the_rest_starving(
    deps: Deps,
) -> None:
    """Issue 19: a round over many idle sessions of one kind makes one claim (it finds
    less than it asked for), not one per session; the others are starving, so a fresh
    submit can be handed to any of them. Another kind gets its own claim."""
    await _insert(deps, 1)
    await _insert(deps, 1, queue="other")
    idle = [_session(f"w{n}", 2) for n in range(50)]
    elsewhere = _session("x", 2, queue="other")
    for session in (*idle, elsewhere):
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    policy = CountingClaims()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    await asyncio.wait_for(dispatcher.step(), 10)
    assert len(policy.order) == 2 and "x" in policy.order
    assert all(s.starving for s in idle) and elsewhere.starving
    assert sum(_queued(s) for s in idle) == 1 and _queued(elsewhere) == 1
    # Credit is spent only where tasks went.
    assert sorted(s.credit for s in idle) == [1] + [2] * 49


class SeenSessions(CountingClaims):
    """Also records how many sessions each round's plan was given to look at."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def plan_lazily(
        self,
        sessions: Iterable[WorkerSession],
        skip: Callable[[WorkerSession], bool] | None = None,
    ) -> Iterator[Claim]:
        given = list(sessions)
        self.seen.append(len(given))
        return super().plan_lazily(given, skip)


async def test_a_poll_round_looks_at_one_session_of_a_large_drained_kind(deps: Deps) -> None:
    """Issue 19: with nothing woken since a round found a kind drained, the slow poll's
    round (the safety net) looks at one of its sessions, not at every one (a round over
    10,000 idle sessions held the loop 10-20 ms every second). Work that became ready
    without a wake is still found: that claim fills, and the next round claims for all."""
    many = [_session(f"w{n}", 1) for n in range(SAMPLED_KIND_SESSIONS)]
    apart = _session("apart", 1, queue="other")
    for session in (*many, apart):
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    policy = SeenSessions()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    await dispatcher.step()  # nothing ready: both kinds drained
    assert policy.seen == [SAMPLED_KIND_SESSIONS + 1] and len(policy.order) == 2
    policy.order.clear()
    # The poll's rounds: one session of the large kind each, another each time; the
    # small kind whole.
    for _ in range(3):
        await dispatcher.step()
    assert policy.seen[1:] == [2, 2, 2]
    sampled = [w for w in policy.order if w != "apart"]
    assert len(sampled) == 3 and len(set(sampled)) == 3
    # A wake (work may be ready): every session again.
    dispatcher.wake()
    await dispatcher.step()
    assert policy.seen[-1] == SAMPLED_KIND_SESSIONS + 1
    # Ready without a wake: the sampled claim fills, so the round asks for another at once.
    await dispatcher.step()
    await _insert(deps, 10)
    assert policy.seen[-1] == 2
    assert await dispatcher.step() == 0.0
    assert policy.seen[-1] == 2
    await dispatcher.step()
    assert policy.seen[-1] == SAMPLED_KIND_SESSIONS + 1
    assert sum((await _running(deps)).values()) == 10


class HeldClaims(DispatchPolicy):
    """Each claim waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(lease_seconds=30, max_payload_bytes=1 << 20)
        self.claiming = asyncio.Event()
        self.go = asyncio.Event()

    async def claim(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        fence: Fence,
        *,
        plain: asyncpg.Connection | None = None,
    ) -> Any:
        self.claiming.set()
        await self.go.wait()
        return await super().claim(conn, claim, fence, plain=plain)


async def test_credit_during_a_round_of_a_kind_drained_before_runs_no_round(deps: Deps) -> None:
    # Issue 19: while a round's claim for a kind runs, the kind is not drained in this
    # round yet; a credit then (50 a second under probe load) woke a round over every
    # session. The round before found it drained and nothing woke since: no round.
    first, second = _session("w1", 1), _session("w2", 0)
    for session in (first, second):
        deps.sessions.reserve(session)
        deps.sessions.activate(session)
    policy = HeldClaims()
    policy.go.set()
    dispatcher = Dispatcher(deps, policy, Leases(deps))
    await dispatcher.step()  # nothing ready: the kind is drained
    policy.go.clear()
    policy.claiming.clear()
    round_ = asyncio.create_task(dispatcher.step())
    await policy.claiming.wait()
    dispatcher._wakeup.clear()
    second.credit = 1
    dispatcher.offer(second)
    assert not dispatcher._wakeup.is_set() and second.starving
    policy.go.set()
    await round_
    # A wake since (work may be ready): an offer runs a round again, even mid-round.
    dispatcher.wake()
    policy.go.clear()
    policy.claiming.clear()
    round_ = asyncio.create_task(dispatcher.step())
    await policy.claiming.wait()
    dispatcher._wakeup.clear()
    dispatcher.offer(second)
    assert dispatcher._wakeup.is_set()
    policy.go.set()
    await round_
