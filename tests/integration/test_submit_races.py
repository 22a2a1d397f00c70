"""An idempotency key raced through both submit lanes (issue 15): only the racing submits
hear of the race, and they hear what won (the same request: that task, deduplicated; a
different one: IDEMPOTENCY_KEY_CONFLICT). A tenant that raced nothing, whose submits
shared the flushes, is never refused. Real concurrent raw gRPC calls (no client resend
to hide a refusal) against a coordinator that requires keys."""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any

import asyncpg
import grpc
import pytest
from security import Key
from tenancy import Secure, secure_coordinator

from conveyor.coordinator.lifecycle.submits import SMALL_SUBMIT_MAX
from conveyor.v1 import task_service_pb2

pytestmark = pytest.mark.slow

ROUNDS = 120
BIG = SMALL_SUBMIT_MAX + 4  # a SubmitTasks this large goes through the other lane


def _task(key: str = "", payload: bytes = b"{}") -> task_service_pb2.SubmitTaskRequest:
    return task_service_pb2.SubmitTaskRequest(type="t", payload=payload, idempotency_key=key)


async def _answer(call: Any) -> str:
    """OK, or the failed call's code name."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _race(secure: Secure, racer: Key, n: int) -> tuple[str, str]:
    """One key raced through both lanes: the same request twice (even ``n``) or two
    different ones (odd); the two answers."""
    key = f"race-{n}"
    other = b'{"differs": true}' if n % 2 else b"{}"
    small = secure.tasks.SubmitTask(_task(key), metadata=racer.metadata)
    big = secure.tasks.SubmitTasks(
        task_service_pb2.SubmitTasksRequest(
            tasks=[_task(key, other), *(_task(f"{key}-{i}") for i in range(BIG - 1))]
        ),
        metadata=racer.metadata,
    )
    first, second = await asyncio.gather(_answer(small), _answer(big))
    return first, second


async def _bystand(
    secure: Secure,
    key: Key,
    lane: str,
    me: int,
    done: asyncio.Event,
    tally: collections.Counter[str],
) -> int:
    """Submits through ``lane`` (small or big), with keys of its own (``me`` tells the
    loops apart), until ``done``; returns the tasks it had written."""
    written = 0
    for n in itertools.count():
        if done.is_set():
            break
        if lane == "small":
            size = 1
            answer = await _answer(
                secure.tasks.SubmitTask(_task(f"by-{me}-{n}"), metadata=key.metadata)
            )
        else:
            size = BIG
            tasks = [_task(f"by-{me}-{n}-{i}") for i in range(BIG)]
            answer = await _answer(
                secure.tasks.SubmitTasks(
                    task_service_pb2.SubmitTasksRequest(tasks=tasks), metadata=key.metadata
                )
            )
        tally[answer] += 1
        written += size if answer == "OK" else 0
    return written


async def test_a_key_raced_through_both_lanes_fails_no_other_tenant(database_dsn: str) -> None:
    async with secure_coordinator(database_dsn) as secure:
        racer = await secure.tenant("racer")
        bystander = await secure.tenant("bystander")
        racers: collections.Counter[str] = collections.Counter()
        bystanders: collections.Counter[str] = collections.Counter()
        done = asyncio.Event()
        load = [
            asyncio.create_task(_bystand(secure, bystander, lane, me, done, bystanders))
            for me, lane in enumerate(("small", "small", "big", "big"))
        ]
        try:
            for n in range(ROUNDS):
                small, big = await _race(secure, racer, n)
                racers[f"{'differ' if n % 2 else 'same'}:{small},{big}"] += 1
        finally:
            done.set()
            written = sum(await asyncio.gather(*load))
        # A tenant that raced nothing is never refused.
        assert set(bystanders) == {"OK"}, bystanders
        submitter = secure.coordinator.submitter
        assert submitter is not None and submitter.races > 0, "no race happened: tune ROUNDS"
        # The same request twice: both answered with the one task. Two different ones:
        # one is written, the other is told the key is taken (never UNAVAILABLE).
        assert set(racers) <= {
            "same:OK,OK",
            "differ:OK,ALREADY_EXISTS",
            "differ:ALREADY_EXISTS,OK",
        }, racers
        conn = await asyncpg.connect(database_dsn)
        try:
            per_key = await conn.fetch(
                "SELECT idempotency_key, count(*) AS n FROM tasks WHERE tenant = 'racer' "
                "AND idempotency_key ~ '^race-[0-9]+$' GROUP BY 1"
            )
            stored = await conn.fetchval("SELECT count(*) FROM tasks WHERE tenant = 'bystander'")
        finally:
            await conn.close()
        assert len(per_key) == ROUNDS and all(r["n"] == 1 for r in per_key)
        assert stored == written
