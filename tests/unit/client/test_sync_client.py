"""The blocking Client, driven from a worker thread while the fake server runs on the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest

from conveyor.client import Client, TaskFailedError, TaskNotFoundError, TaskState
from conveyor.v1 import task_pb2


def _task(state: int, **fields: Any) -> task_pb2.Task:
    return task_pb2.Task(id="w", queue="default", type="demo", state=state, **fields)  # type: ignore[arg-type]


async def test_sync_client_end_to_end(fake: Any, address: str) -> None:
    for i in range(5):
        fake.add_task(id=f"t{i}")
    fake.add_task(id="w", state=task_pb2.TASK_STATE_PENDING)
    fake.watch_scripts["w"] = [
        [_task(1), _task(3), grpc.StatusCode.UNAVAILABLE],
        [_task(4, result=b'"done"')],
    ]

    def work() -> dict[str, Any]:
        with Client(address, api_key="k") as client:
            submitted = client.submit("t", {"a": 1}, idempotency_key="i")
            many = client.submit_many([{"type": "t"}, {"type": "u"}])
            page = client.list(page_size=2)
            every = [t.id for t in client.iter_tasks(page_size=2)]
            states = [t.state for t in client.watch("w")]
            outcome = client.result("w", timeout=5)
            task, attempts = client.get_with_attempts("t0")
            cancelled = client.cancel("t1")
            with pytest.raises(TaskNotFoundError):
                client.get("missing")
            return {
                "submitted": submitted,
                "many": many,
                "page": page,
                "every": every,
                "states": states,
                "outcome": outcome,
                "task": task,
                "attempts": attempts,
                "cancelled": cancelled,
                "queues": client.queues(),
            }

    got = await asyncio.to_thread(work)
    assert got["submitted"].idempotency_key == "i"
    assert [t.type for t in got["many"]] == ["t", "u"]
    assert len(got["page"]) == 2 and got["page"].next_page_token == "2"
    assert got["every"][:5] == [f"t{i}" for i in range(5)] and len(got["every"]) == 9
    assert got["states"] == [TaskState.PENDING, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert got["outcome"] == "done"
    assert got["task"].id == "t0" and got["attempts"][0].error == "boom"
    assert got["cancelled"].state is TaskState.CANCELLED
    assert got["queues"] == []


async def test_sync_errors_and_early_exit(fake: Any, address: str, hang: str) -> None:
    fake.add_task(id="d", state=task_pb2.TASK_STATE_DEAD, last_error="bad input")
    fake.add_task(id="w")
    fake.watch_scripts["w"] = [[_task(3), hang]]

    def work() -> None:
        client = Client(address)
        with pytest.raises(TaskFailedError, match="bad input"):
            client.result("d")
        # Leaving a watch early closes its stream instead of leaking it.
        for task in client.watch("w"):
            assert task.state is TaskState.RUNNING
            break
        client.close()
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            client.get("d")

    await asyncio.to_thread(work)


def test_close_stops_the_background_thread() -> None:
    before = {t.ident for t in threading.enumerate()}
    client = Client("127.0.0.1:1")
    client.close()
    leftover = [
        t for t in threading.enumerate() if t.ident not in before and t.name == "conveyor-client"
    ]
    assert leftover == []


def _client_threads() -> int:
    return sum(t.name == "conveyor-client" for t in threading.enumerate())


def test_bad_arguments_leak_no_thread() -> None:
    before = _client_threads()
    with pytest.raises(ValueError, match="no coordinator address"):
        Client([])
    assert _client_threads() == before
