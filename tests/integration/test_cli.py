"""The ``conveyor`` command: task commands against a coordinator, one-line errors, and
``conveyor dev`` end to end (the README's first command) with Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from conveyor.coordinator import Coordinator

CLI = [sys.executable, "-m", "conveyor.cli.main"]


async def _conveyor(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_get_list_cancel(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    code, out, err = await _conveyor(*where, "submit", "echo", '{"n": 1}', "--queue", "cli")
    assert code == 0, err
    task_id = out.strip()
    code, out, _ = await _conveyor(*where, "get", task_id, "--json")
    assert code == 0
    shown = json.loads(out)
    assert (shown["id"], shown["state"], shown["payload"]) == (task_id, "PENDING", {"n": 1})
    code, out, _ = await _conveyor(*where, "tasks", "--queue", "cli")
    assert code == 0 and task_id in out
    code, out, _ = await _conveyor(*where, "queues")
    assert code == 0 and "cli" in out
    code, out, _ = await _conveyor(*where, "cancel", task_id)
    assert code == 0 and "CANCELLED" in out
    code, out, _ = await _conveyor(*where, "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["mode"] == "single-node"
    assert status["leader"]["address"] == coordinator.address
    assert status["epoch"] == str(coordinator.epoch)  # int64 is a string in proto3 JSON


async def test_errors_are_one_line(coordinator: Coordinator) -> None:
    where = ["--coordinator", coordinator.address]
    code, _, err = await _conveyor(*where, "submit", "echo", "{not json")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("conveyor: ") and "JSON" in err
    code, _, err = await _conveyor(*where, "submit", "", "1")
    assert code == 1
    assert err.startswith("conveyor: ") and "type" in err and "Traceback" not in err
    code, _, err = await _conveyor(*where, "get", "01900000-0000-7000-8000-000000000000")
    assert code == 1 and "not found" in err and "Traceback" not in err
    code, _, err = await _conveyor("coordinator")
    assert code == 2 and "--dsn" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_dev_runs_the_demo_and_stops_on_ctrl_c() -> None:
    # Not pytest's tmp_path: as root the server runs as another user that must reach it.
    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-test-dev-"))
    address = f"127.0.0.1:{_free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "dev",
        "--listen",
        address,
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        banner = ""
        async with asyncio.timeout(120):
            while "Press Ctrl-C" not in banner:
                line = await proc.stdout.readline()
                assert line, f"conveyor dev exited early:\n{banner}"
                banner += line.decode()
        assert "grpcurl" in banner and address in banner
        code, out, err = await _conveyor(
            "--coordinator", address, "submit", "echo", '"hi"', "--wait", "--json"
        )
        assert code == 0, err
        assert json.loads(out)["state"] == "SUCCEEDED"
        assert json.loads(out)["result"] == "hi"
        code, out, err = await _conveyor(
            "--coordinator", address, "submit", "fail", "null", "--max-attempts", "1", "--wait"
        )
        assert code == 1 and "demo failure" in out
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0, rest
        assert "stopped." in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
