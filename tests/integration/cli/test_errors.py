"""Every expected failure of the ``conveyor`` command is one line on stderr in CLI terms
(``--debug`` adds the traceback), and a reader that stops reading is no failure."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from clitools import CLI, conveyor

from conveyor.coordinator import Coordinator

MISSING_TASK = "01900000-0000-7000-8000-000000000000"


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert "Traceback" not in err
    return err.strip()


@pytest.mark.slow
async def test_bad_input_and_missing_things(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    done = await conveyor(*where, "submit", "echo", "{not json")
    assert done.code == 2
    assert one_line(done.err).startswith("conveyor: the payload is not valid JSON")
    done = await conveyor(*where, "submit", "", "1")
    assert done.code == 1
    assert one_line(done.err) == "conveyor: invalid request: type: must not be empty"
    done = await conveyor(*where, "get", MISSING_TASK)
    assert done.code == 1
    assert one_line(done.err) == (
        f"conveyor: no task with id {MISSING_TASK} (conveyor tasks lists recent ones)"
    )
    done = await conveyor(*where, "cancel", MISSING_TASK)
    assert done.code == 1 and "no task with id" in one_line(done.err)
    done = await conveyor("coordinator")
    assert done.code == 2 and "--dsn" in one_line(done.err)


async def test_finished_task_transitions_in_cli_terms(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    task_id = (await conveyor(*where, "submit", "echo")).out.strip()
    assert (await conveyor(*where, "cancel", task_id)).code == 0
    # A cancelled task is redriven; the task, pending again, is not.
    assert (await conveyor(*where, "retry", task_id)).code == 0
    done = await conveyor(*where, "retry", task_id)
    line = one_line(done.err)
    assert done.code == 1 and f"task {task_id} is pending" in line
    assert "conveyor retry only dead or cancelled ones" in line
    assert "TASK_STATE" not in line and "retry(" not in line and "PENDING" not in line


async def test_usage_errors_are_one_line() -> None:
    done = await conveyor("tasks", "--state", "bogus")
    assert done.code == 2
    line = one_line(done.err)
    assert line.startswith("conveyor tasks: ") and "'dead'" in line and "unspecified" not in line
    assert line.endswith("(see conveyor tasks --help)")
    done = await conveyor("worker", "--no-such-flag")
    assert done.code == 2 and one_line(done.err).startswith("conveyor worker: ")
    done = await conveyor("worker")
    assert done.code == 2
    assert one_line(done.err) == "conveyor: name the worker to run (MODULE[:ATTR]) or pass --demo"


async def test_coordinator_settings_that_do_not_fit_are_one_line_in_flag_terms() -> None:
    """CoordinatorConfig's own rules, worded with the flags that set them (and nothing is
    started: the DSN names no reachable server)."""
    dsn = ["--dsn", "postgresql://nobody@127.0.0.1:1/none"]
    done = await conveyor("coordinator", *dsn, "--liveness-timeout", "50")
    assert done.code == 2
    line = one_line(done.err)
    assert "liveness timeout 50s plus one heartbeat interval" in line
    assert "must not exceed --lease-duration 30s" in line
    done = await conveyor("coordinator", *dsn, "--max-backlog", "-1")
    assert done.code == 2 and "--max-backlog must be 0 (no limit) or positive" in one_line(done.err)


async def test_bad_worker_module_path(tmp_path: Path) -> None:
    done = await conveyor("worker", "no_such_module_here:worker", cwd=tmp_path)
    assert done.code == 2
    assert "cannot import worker module 'no_such_module_here'" in one_line(done.err)
    (tmp_path / "app.py").write_text("worker = 42\n")
    done = await conveyor("worker", "app", cwd=tmp_path)
    assert done.code == 2 and "app" in one_line(done.err)


async def test_unreachable_coordinator_and_debug() -> None:
    args = ["submit", "echo", "--coordinator", "127.0.0.1:1", "--rpc-timeout", "2"]
    done = await conveyor(*args)
    assert done.code == 1
    assert one_line(done.err) == (
        "conveyor: cannot reach the coordinator at 127.0.0.1:1: is it running? "
        "(conveyor dev starts one; --coordinator names another)"
    )
    done = await conveyor(*args, "--debug")
    assert done.code == 1
    assert "Traceback" in done.err
    assert done.err.splitlines()[-1].startswith("conveyor: cannot reach the coordinator")


async def test_wait_that_times_out(coordinator: Coordinator) -> None:
    done = await conveyor(
        "submit", "nobody-serves-this", "--wait", "--wait-timeout", "1",
        "--coordinator", coordinator.address,
    )  # fmt: skip
    assert done.code == 1
    lines = done.err.splitlines()
    assert lines[0].startswith("submitted ") and lines[0].endswith("waiting for it to finish…")
    last = lines[-1]
    assert last.startswith("conveyor: gave up waiting after 1s: task ") and " is pending" in last
    assert "conveyor cancel" in last and "cancel(" not in last


@pytest.mark.parametrize("args", [["status"], ["queues"], ["--help"]])
async def test_closed_stdout_exits_0_quietly(coordinator: Coordinator, args: list[str]) -> None:
    """As in `conveyor status | head -3`, with the reader gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, "--coordinator", coordinator.address,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (0, "")


def test_module_entry_point_matches_console_script() -> None:
    """The console script and `python -m conveyor.cli.main` are the same program."""
    script = Path(sys.executable).parent / "conveyor"
    assert script.exists(), "pip install -e . puts the conveyor script beside python"
    assert "conveyor.cli.main" in script.read_text()
