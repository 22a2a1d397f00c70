"""``conveyor queues pause``, ``conveyor dead groups|retry`` and ``conveyor retry`` of a
cancelled task, against a real coordinator (the calls behind them are tested in
tests/integration/test_queue_ops.py)."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor
from testsupport import RawWorker, submit

from conveyor.coordinator import Coordinator
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc, worker_service_pb2

pytestmark = pytest.mark.slow  # five CLI processes


async def test_queue_and_dead_letter_commands(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    raw_workers: object,
) -> None:
    where = ["--coordinator", coordinator.address]
    done = await conveyor(*where, "queues", "pause", "mail")
    assert done.code == 0, done.err
    assert done.out.strip() == "queue mail paused (0 pending, 0 running)"
    done = await conveyor(*where, "queues", "--json")
    assert done.code == 0, done.err
    assert [(q["name"], q["paused"]) for q in json.loads(done.out)] == [("mail", True)]

    # Two dead tasks of one fingerprint (on another queue: mail is paused), and a
    # cancelled one.
    assert callable(raw_workers)
    worker: RawWorker = raw_workers()
    await worker.connect("cli-dlq", credits=10, types=("send",), queues=("sms",))
    for _ in range(2):
        await submit(stub, "send", queue="sms", max_attempts=1)
    for assignment in await worker.assignments(2):
        await worker.report(
            assignment.lease,
            worker_service_pb2.TASK_OUTCOME_FAILED,
            error="TimeoutError: smtp\nTraceback ...",
            retryable=False,
        )
    await worker.close()
    cancelled = await submit(stub, "send", queue="later")
    await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=cancelled.id))

    done = await conveyor(*where, "dead", "groups")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].split()[:3] == ["COUNT", "TYPE", "FINGERPRINT"]
    assert lines[1].split()[:4] == ["2", "send", "TimeoutError:", "smtp"]
    done = await conveyor(
        *where, "dead", "retry", "--all", "--fingerprint", "TimeoutError: smtp", "--type", "send"
    )
    assert done.code == 0 and done.out.strip() == "redrove 2 tasks", done.out + done.err
    # Issue 20, break 6: `conveyor retry` takes a cancelled task.
    done = await conveyor(*where, "retry", cancelled.id)
    assert done.code == 0 and done.out.strip() == f"{cancelled.id} pending", done.err
