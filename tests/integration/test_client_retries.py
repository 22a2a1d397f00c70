"""The client's automatic retries against a real coordinator: a submit whose response was
lost is resent under the same idempotency key and written once; without the key the
outcome is reported unknown. The loss is injected with a client interceptor, through the
same ConnectionOptions seam that tracing and API keys use."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest
from grpc import aio

from conveyor.client import AsyncClient, ConnectionOptions, UnavailableError
from conveyor.coordinator import Coordinator


class LoseResponses(aio.UnaryUnaryClientInterceptor):
    """Lets the first ``count`` calls of ``method`` reach the server, then drops their
    responses as a connection reset would: the client cannot know they were applied."""

    def __init__(self, method: str, count: int = 1) -> None:
        self.method = method
        self.remaining = count
        self.lost = 0

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        call = await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/" + self.method) and self.remaining > 0:
            await call  # the coordinator answered: the write is committed
            self.remaining -= 1
            self.lost += 1
            raise aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                aio.Metadata(),
                aio.Metadata(),
                details="connection reset by peer (injected)",
            )
        return call


async def _count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks"))


async def test_lost_submit_response_is_resent_and_written_once(
    coordinator: Coordinator, db: asyncpg.Connection
) -> None:
    lose = LoseResponses("SubmitTask")
    options = ConnectionOptions(interceptors=(lose,))
    async with AsyncClient(coordinator.address, options=options) as client:
        task = await client.submit("echo", {"n": 1})
    assert lose.lost == 1
    assert await _count(db) == 1
    # The task's id is the one the client made, and no idempotency key was needed.
    assert uuid.UUID(task.id).version == 7
    assert task.idempotency_key is None
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE id = $1::uuid", task.id) == 1


async def test_lost_batch_response_is_resent_and_written_once(
    coordinator: Coordinator, db: asyncpg.Connection
) -> None:
    lose = LoseResponses("SubmitTasks")
    options = ConnectionOptions(interceptors=(lose,))
    async with AsyncClient(coordinator.address, options=options) as client:
        tasks = await client.submit_many([{"type": "echo", "payload": i} for i in range(50)])
    assert lose.lost == 1
    assert await _count(db) == 50
    assert len({t.id for t in tasks}) == 50
    assert all(t.idempotency_key is None for t in tasks)


async def test_without_a_key_a_lost_response_is_an_unknown_outcome(
    coordinator: Coordinator, db: asyncpg.Connection
) -> None:
    lose = LoseResponses("SubmitTask")
    options = ConnectionOptions(interceptors=(lose,))
    async with AsyncClient(coordinator.address, options=options, retry_submits=False) as client:
        with pytest.raises(UnavailableError, match="may have reached the server"):
            await client.submit("echo", {"n": 1})
    # It did reach the server: resending blindly would have made a second task.
    assert await _count(db) == 1
