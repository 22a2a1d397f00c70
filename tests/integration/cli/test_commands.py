"""The ``conveyor`` task, queue, schedule and status commands against a real coordinator,
with global options before or after the command."""

from __future__ import annotations

import json

import pytest
from clitools import conveyor

from conveyor.coordinator import Coordinator


@pytest.mark.slow
async def test_submit_get_list_cancel(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    done = await conveyor(*where, "submit", "echo", '{"n": 1}', "--queue", "cli")
    assert done.code == 0, done.err
    task_id = done.out.strip()
    done = await conveyor(*where, "get", task_id, "--json")
    assert done.code == 0, done.err
    shown = json.loads(done.out)
    assert (shown["id"], shown["state"], shown["payload"]) == (task_id, "PENDING", {"n": 1})
    assert shown["uncounted_attempts"] == 0
    done = await conveyor(*where, "get", task_id)
    assert done.code == 0 and "attempts:     0 of 3" in done.out
    done = await conveyor(*where, "tasks", "--queue", "cli")
    assert done.code == 0 and task_id in done.out and "pending" in done.out
    done = await conveyor(*where, "queues")
    assert done.code == 0 and done.out.split("\n")[0].split()[-1] == "WORKERS"
    assert any(line.split()[0] == "cli" for line in done.out.splitlines()[1:])
    done = await conveyor(*where, "cancel", task_id)
    assert done.code == 0 and done.out.strip() == f"{task_id} cancelled"
    # Lower case, as the table prints it; upper case too.
    for state in ("cancelled", "CANCELLED"):
        done = await conveyor(*where, "tasks", "--state", state, "--json")
        assert done.code == 0, done.err
        assert [t["id"] for t in json.loads(done.out)] == [task_id]
    done = await conveyor(*where, "status", "--json")
    assert done.code == 0
    status = json.loads(done.out)
    assert status["mode"] == "single-node"
    assert status["leader"]["address"] == coordinator.address
    assert status["epoch"] == str(coordinator.epoch)  # int64 is a string in proto3 JSON


async def test_global_options_before_or_after_the_command(coordinator: Coordinator) -> None:
    good, bad = coordinator.address, "127.0.0.1:1"
    before = await conveyor("--coordinator", good, "queues")
    after = await conveyor("queues", "--coordinator", good)
    assert before.code == after.code == 0, before.err + after.err
    # After the command wins over before it (and over the environment).
    both = await conveyor("--coordinator", bad, "queues", "--coordinator", good)
    env = await conveyor("queues", "--coordinator", good, env={"CONVEYOR_COORDINATOR": bad})
    assert both.code == env.code == 0, both.err + env.err
    # In a command group too, and the others (--rpc-timeout, --log-level).
    done = await conveyor(
        "schedules", "list", "--coordinator", good, "--rpc-timeout", "5", "--log-level", "warning"
    )
    assert done.code == 0 and done.out.strip() == "no schedules", done.err
    # Only where given is it used: the bad address before the command fails.
    done = await conveyor("--coordinator", bad, "queues", "--rpc-timeout", "3")
    assert done.code == 1 and "cannot reach the coordinator at 127.0.0.1:1" in done.err


async def test_status_lists_workers_and_health(
    coordinator: Coordinator, raw_workers: object
) -> None:
    from testsupport import RawWorker

    assert callable(raw_workers)
    worker: RawWorker = raw_workers()
    await worker.connect(
        "cli-worker", types=("echo", "resize"), queues=("media",), encryption_keys=("k1", "k2")
    )
    done = await conveyor("status", "--coordinator", coordinator.address)
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    # Every tenant's workers (an admin's view; authentication off), each with its tenant.
    header = next(line for line in lines if line.split()[:1] == ["TENANT"])
    assert header.split() == [
        "TENANT", "WORKER", "HOST", "PID", "QUEUES", "TASK", "TYPES", "KEYS", "IN", "FLIGHT",
        "CREDIT", "STATE",
    ]  # fmt: skip
    row = next(line.split() for line in lines if line.split()[1:2] == ["cli-worker"])
    assert row[0] == "default"
    assert "media" in row and "k1,k2" in row and row[-1] == "active"
    done = await conveyor("health", "--coordinator", coordinator.address)
    assert (done.code, done.out.strip()) == (0, f"{coordinator.address} SERVING")
    done = await conveyor("health", "--coordinator", "127.0.0.1:1", "--rpc-timeout", "2")
    assert (done.code, done.out.strip()) == (1, "127.0.0.1:1 UNREACHABLE")


async def test_schedules_print_times_in_their_zone(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    done = await conveyor(
        "schedules", "create", "nightly", "0 2 * * *", "echo", '"hi"',
        "--time-zone", "Europe/Berlin", *where,
    )  # fmt: skip
    assert done.code == 0, done.err
    next_line = next(line for line in done.out.splitlines() if line.startswith("next:"))
    first = next_line.removeprefix("next:").strip().split(",")[0]
    assert first.split()[1] == "02:00:00" and first.split()[2] in ("CET", "CEST"), next_line
    done = await conveyor("schedules", "list", *where)
    assert done.code == 0 and ("02:00:00 CET" in done.out or "02:00:00 CEST" in done.out)
    done = await conveyor("schedules", "delete", "nightly", *where)
    assert (done.code, done.out.strip()) == (0, "nightly deleted")
    done = await conveyor("schedules", "delete", "nightly", *where)
    assert done.code == 1
    assert done.err.startswith("conveyor: no schedule named nightly (")


async def test_submit_with_labels_and_list_by_label(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    billing = await conveyor(
        *where, "submit", "echo", "--label", "team=billing", "--label", "env=dev"
    )
    assert billing.code == 0, billing.err
    other = await conveyor(*where, "submit", "echo", "--label", "team=search")
    assert other.code == 0, other.err
    done = await conveyor(*where, "get", billing.out.strip(), "--json")
    assert json.loads(done.out)["labels"] == {"team": "billing", "env": "dev"}
    done = await conveyor(*where, "tasks", "--label", "team=billing", "--json")
    assert done.code == 0, done.err
    assert [t["id"] for t in json.loads(done.out)] == [billing.out.strip()]
    done = await conveyor(*where, "tasks", "--label", "team=billing", "--label", "env=prod")
    assert done.code == 0 and done.out.strip() == "no tasks match"
    done = await conveyor(*where, "submit", "echo", "--label", "no-value")
    assert done.code == 2
    assert "Invalid value for '--label': 'no-value' is not KEY=VALUE" in done.err
