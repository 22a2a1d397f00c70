"""``conveyor worker --autoscale MIN:MAX``: real worker processes, started and drained by
the supervisor from the load the coordinator reports (1 -> 3 -> 1 under a burst), and a
SIGKILLed one replaced."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from clitools import CLI
from processes import Command
from testsupport import eventually

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store.tasks import CANCELLED, PENDING
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc

BURST = 24


def live_pids(coordinator: Coordinator) -> set[int]:
    """The worker processes connected now (each says its pid in Hello)."""
    return {s.pid for s in coordinator.sessions if not s.closed and not s.draining}


def exactly(coordinator: Coordinator, count: int, without: int = 0) -> Callable[[], set[int]]:
    """A check for :func:`eventually`: the live pids once there are ``count`` (none of them
    ``without``), else an empty set."""

    def check() -> set[int]:
        pids = live_pids(coordinator)
        return pids if len(pids) == count and without not in pids else set()

    return check


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_autoscale_scales_up_and_down_and_replaces_a_killed_process(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    supervisor = Command(
        "autoscale",
        [*CLI, "worker", "--demo", "--concurrency", "2", "--coordinator", coordinator.address,
         "--autoscale", "1:3", "--autoscale-interval", "0.3", "--autoscale-cooldown", "1",
         "--autoscale-latency", "60", "--grace-period", "5"],
        tmp_path,
    ).start()  # fmt: skip
    seen: set[int] = set()
    try:
        (first,) = await eventually(exactly(coordinator, 1), timeout=30, what="1 worker")
        seen.add(first)

        # A burst: 24 long tasks for processes of concurrency 2 ask for 12: capped at 3.
        # They run until cancelled, so the burst outlasts however slow the processes start.
        request = task_service_pb2.SubmitTasksRequest(
            tasks=[task_service_pb2.SubmitTaskRequest(type="sleep", payload=b"600")] * BURST
        )
        reply = await stub.SubmitTasks(request, timeout=10)
        three = await eventually(exactly(coordinator, 3), timeout=60, what="3 workers")
        assert first in three
        seen |= three

        # The burst over (cancelled), the supervisor drains back down to MIN, one at a time.
        for result in reply.results:
            cancel = task_service_pb2.CancelTaskRequest(id=result.task.id)
            await stub.CancelTask(cancel, timeout=10)

        async def all_cancelled() -> bool:
            done = await db.fetchval("SELECT count(*) FROM tasks WHERE state = $1", CANCELLED)
            return bool(done == BURST)

        await eventually(all_cancelled, timeout=30, what="the burst cancelled")
        (last,) = await eventually(exactly(coordinator, 1), timeout=30, what="back to 1")
        drained = three - {last}
        await eventually(lambda: not any(pid_alive(p) for p in drained), timeout=30)

        # The supervisor says so once it has reaped each (a moment after the pid is gone).
        def drain_logged() -> bool:
            log = supervisor.output()
            said = "exited with 0 after it was asked to drain"
            return all(f"(pid {p}) {said}" in log for p in drained)

        await eventually(drain_logged, timeout=30, what="each drained exit logged")
        log = supervisor.output()
        assert "3 -> 2 worker processes" in log and "2 -> 1 worker processes" in log

        # A process killed outright is replaced (after its backoff), and the log says so.
        os.kill(last, signal.SIGKILL)
        (replacement,) = await eventually(
            exactly(coordinator, 1, without=last), timeout=30, what="the killed one replaced"
        )
        seen.add(replacement)
        log = supervisor.output()
        assert f"(pid {last}) was killed by SIGKILL" in log
        assert "restarting it in" in log

        # SIGTERM drains the last one too, and the supervisor exits 0.
        supervisor.signal(signal.SIGTERM)
        assert await supervisor.wait_exit(30) == 0, supervisor.output()
        assert not pid_alive(replacement)
    finally:
        supervisor.close()
        for pid in seen:  # each in its own process group: not reached by close()
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_autoscale_counts_only_the_types_its_workers_serve(
    coordinator: Coordinator,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """A backlog no process of it could take (a type the demo worker has no handler for),
    however long it waits, starts no process; one of a type it serves does."""
    supervisor = Command(
        "autoscale",
        [*CLI, "worker", "--demo", "--concurrency", "2", "--coordinator", coordinator.address,
         "--autoscale", "1:3", "--autoscale-interval", "0.3", "--autoscale-cooldown", "1",
         "--autoscale-latency", "0.5", "--grace-period", "5", "--log-level", "debug"],
        tmp_path,
    ).start()  # fmt: skip
    seen: set[int] = set()
    try:
        seen |= await eventually(exactly(coordinator, 1), timeout=30, what="1 worker")
        unserved = task_service_pb2.SubmitTasksRequest(
            tasks=[task_service_pb2.SubmitTaskRequest(type="send-email", payload=b"{}")] * 8
        )
        await stub.SubmitTasks(unserved, timeout=10)

        async def waited_past_latency() -> bool:
            age = await db.fetchval(
                "SELECT extract(epoch FROM now() - min(run_at)) FROM tasks WHERE state = $1",
                PENDING,
            )
            return bool(age is not None and age > 1.0)

        await eventually(waited_past_latency, timeout=30, what="the backlog older than 0.5 s")
        before = len(supervisor.output())

        def looked_three_times() -> bool:
            return supervisor.output()[before:].count("oldest ready task waited") >= 3

        await eventually(looked_three_times, timeout=30, what="3 looks at the load")
        log = supervisor.output()[before:]
        assert "started (pid" not in log and " -> " not in log, log
        assert "load 0 tasks, oldest ready task waited 0.0s" in log, log

        # Work it serves: 4 tasks for processes of concurrency 2 ask for 2.
        served = task_service_pb2.SubmitTasksRequest(
            tasks=[task_service_pb2.SubmitTaskRequest(type="sleep", payload=b"600")] * 4
        )
        reply = await stub.SubmitTasks(served, timeout=10)
        seen |= await eventually(exactly(coordinator, 2), timeout=60, what="2 workers")
        for result in reply.results:
            await stub.CancelTask(task_service_pb2.CancelTaskRequest(id=result.task.id), timeout=10)
        supervisor.signal(signal.SIGTERM)
        assert await supervisor.wait_exit(30) == 0, supervisor.output()
    finally:
        supervisor.close()
        for pid in seen:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
