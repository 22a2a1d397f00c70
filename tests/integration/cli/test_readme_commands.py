"""Every shell block of the README, run as a user pastes it, against a real ``conveyor dev``
(issue 20, break 1: the grpcurl ``CreateSchedule`` example had no key and failed with
Unauthenticated, and no test ran the README's shell blocks).

A block the tests cannot run here (TLS files, other machines, Docker, Kubernetes, a
PostgreSQL of your own) carries ``<!-- not run by tests: WHY -->`` on the line before its
fence; its commands and flags are still checked to exist (``tests/unit/test_readme.py``)
and WHY names what checks the rest. Every other block runs in bash with ``set -e``, in a
folder holding the README's ``myapp/tasks.py``, with these stand-ins: the dev cluster's
address for ``127.0.0.1:50051``, its admin key for ``cvk_...``, a real task id for
``<task id>`` and a real key id for the example's. A long-running command (a worker) runs
in the background until its block ends.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from pathlib import Path

import pytest
from clitools import dev_data_dir, dev_process, remove_dev_data, shell
from processes import free_port

from conveyor.client import AsyncClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
README = (REPO / "README.md").read_text()
_BLOCK = re.compile(r"(?:<!-- not run by tests: (?P<why>[^>]+) -->\n)?^```sh\n(?P<body>.*?)^```",
                    re.MULTILINE | re.DOTALL)  # fmt: skip
_PYTHON = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: Commands that run until stopped: started in the background for the rest of the block.
LONG_RUNNING = ("conveyor worker ", "conveyor dev", "conveyor coordinator ", "conveyor console")
#: The key id the README's `conveyor keys revoke` example shows.
EXAMPLE_KEY_ID = "7xq2mrk4bd2a"


def blocks() -> list[tuple[int, str, str | None]]:
    """(line, body, why not run) of each sh block."""
    return [
        (README[: m.start("body")].count("\n") + 1, m["body"], m["why"])
        for m in _BLOCK.finditer(README)
    ]


def worker_module() -> str:
    """The README's ``myapp/tasks.py`` (the Python block its text says to save as that)."""
    after = README.split("`myapp/tasks.py`", 1)[1]
    match = _PYTHON.search(after)
    assert match and "worker = Worker(" in match[1], "no myapp/tasks.py block in the README"
    return match[1]


def script(body: str, address: str, key: str, task_id: str, key_id: str) -> str:
    """The block as bash runs it: stand-ins filled in, long-running commands backgrounded."""
    text = (
        body.replace("127.0.0.1:50051", address)
        .replace("cvk_...", key)
        .replace("<task id>", task_id)
        .replace(EXAMPLE_KEY_ID, key_id)
    )
    stop = "status=$?; kill $(jobs -p) 2>/dev/null || true; wait || true; exit $status"
    lines = ["set -euo pipefail", f"trap '{stop}' EXIT"]
    for line in text.replace("\\\n", " ").splitlines():
        command = line.split("  #", 1)[0].strip()
        lines.append(f"{command} &" if command.startswith(LONG_RUNNING) else line)
    return "\n".join(lines)


def test_every_block_runs_or_says_why_not() -> None:
    found = blocks()
    assert len(found) >= 15 and sum(why is None for _, _, why in found) >= 8
    for line, _, why in found:
        assert why is None or len(why.strip()) > 10, f"README line {line}: say why it is not run"
    assert "DSN" not in "".join(body for _, body, why in found if why is None)


async def test_readme_shell_blocks_run_against_conveyor_dev(tmp_path: Path) -> None:
    data_dir = dev_data_dir()
    address = f"127.0.0.1:{free_port()}"
    try:
        async with dev_process(data_dir, address) as dev:
            banner = await dev.read_until("Press Ctrl-C")
            (key,) = re.findall(r"export CONVEYOR_API_KEY=(\S+)", banner)
            async with AsyncClient(address, api_key=key, timeout=10) as client:
                task_id = (await client.submit("echo", "readme")).id
            env = (
                f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH "
                f"CONVEYOR_COORDINATOR={address} CONVEYOR_API_KEY={shlex.quote(key)}"
            )
            code, out = await shell(
                f"{env}\nconveyor keys create --tenant shop --scope read --json", REPO
            )
            assert code == 0, out
            (key_id,) = re.findall(r'"id": "(\w+)"', out)

            async def run(line: int, body: str) -> tuple[int, int, str]:
                cwd = tmp_path / f"block-{line}"
                (cwd / "myapp").mkdir(parents=True)
                (cwd / "myapp" / "tasks.py").write_text(
                    worker_module().replace("127.0.0.1:50051", address)
                )
                code, out = await shell(
                    f"{env}\n{script(body, address, key, task_id, key_id)}", cwd, timeout=90
                )
                return line, code, out

            runnable = [(line, body) for line, body, why in blocks() if why is None]
            results = await asyncio.gather(*(run(line, body) for line, body in runnable))
            failed = [f"README line {line} (exit {code}):\n{out}" for line, code, out in results
                      if code != 0]  # fmt: skip
            assert not failed, "\n\n".join(failed)
    finally:
        remove_dev_data(data_dir)
