"""``conveyor queues`` shows a count that reached ListQueues' cap as at least that many
(docs/performance.md, issue 19, seventh round), in its table, its JSON and the answer to
pause, against a real coordinator."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor
from testsupport import submit

from conveyor.coordinator import Coordinator
from conveyor.coordinator.api import queue_ops
from conveyor.v1 import task_service_pb2_grpc

pytestmark = pytest.mark.slow  # CLI processes


async def test_capped_counts_show_as_at_least(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for _ in range(3):
        await submit(stub, "t", queue="deep")
    await submit(stub, "t", queue="shallow")
    where = ["--coordinator", coordinator.address]

    done = await conveyor(*where, "queues", "--count-limit", "2")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].split() == [
        "QUEUE", "PENDING", "SCHEDULED", "RUNNING", "DEAD", "PAUSED", "WORKERS"
    ]  # fmt: skip
    assert lines[1].split() == ["deep", "2+", "0", "0", "0", "no", "0"]
    assert lines[2].split() == ["shallow", "1", "0", "0", "0", "no", "0"]

    done = await conveyor(*where, "queues", "--json", "--count-limit", "2")
    assert done.code == 0, done.err
    counts = {
        q["name"]: (q["pending"], q["pending_capped"], q["scheduled_capped"], q["dead_capped"])
        for q in json.loads(done.out)
    }
    assert counts == {"deep": (2, True, False, False), "shallow": (1, False, False, False)}

    # Pause answers with the server's default cap (the coordinator is in this process).
    monkeypatch.setattr(queue_ops, "DEFAULT_COUNT_LIMIT", 2)
    done = await conveyor(*where, "queues", "pause", "deep")
    assert done.code == 0, done.err
    assert done.out.strip() == "queue deep paused (2+ pending, 0 running)"
    done = await conveyor(*where, "queues")  # the default: 0, the server's cap
    assert done.code == 0, done.err
    assert done.out.splitlines()[1].split()[:3] == ["deep", "2+", "0"]
