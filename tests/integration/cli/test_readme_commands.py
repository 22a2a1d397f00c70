"""Every shell block of the README and of the docs pages it sends newcomers to, run as a
user pastes it, against a real ``conveyor dev`` (issue 20, break 1: the grpcurl
``CreateSchedule`` example had no key and failed with Unauthenticated, and no test ran
the README's shell blocks).

A block the tests cannot run here (TLS files, other machines, Docker, Kubernetes, a
PostgreSQL of your own) carries ``<!-- not run by tests: WHY -->`` on the line before its
fence; its commands and flags are still checked to exist (``tests/unit/test_readme.py``)
and WHY names what checks the rest. Every other block runs in bash with ``set -e``, in the
folder ``conveyor dev`` runs in (its key is found there, as the README says: no key is
exported but by the blocks themselves, whose ``export`` lines the later blocks inherit as
a user's shell would), holding the README's ``myapp/tasks.py``, with these stand-ins:
the dev cluster's address for ``127.0.0.1:50051``, real ids for ``<task id>`` (a waiting
task), ``<dead task id>`` and the key id of the ``keys revoke`` example. A long-running
command (a worker) runs in the background until its block ends; a line whose comment
says ``(exits 1)`` must exit 1, one that says ``(runs until Ctrl-C)`` must still run after
a few seconds.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from clitools import banner_commands, dev_data_dir, dev_process, remove_dev_data, shell
from processes import free_port
from security import Keys

from conveyor.client import AsyncClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
PAGES = ("README.md", "docs/security.md", "docs/operations.md")
_BLOCK = re.compile(r"(?:<!-- not run by tests: (?P<why>[^>]+) -->\n)?^```sh\n(?P<body>.*?)^```",
                    re.MULTILINE | re.DOTALL)  # fmt: skip
_PYTHON = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: Commands that run until stopped: started in the background for the rest of the block.
LONG_RUNNING = ("conveyor worker ", "conveyor dev", "conveyor coordinator ", "conveyor console")
#: How long a command that streams until Ctrl-C must keep running.
STREAM_SECONDS = 5
#: The key id the README's `conveyor keys revoke` example shows.
EXAMPLE_KEY_ID = "7xq2mrk4bd2a"


def blocks() -> list[tuple[str, str, str | None]]:
    """(where, body, why not run) of each sh block of the pages, in reading order."""
    found = []
    for page in PAGES:
        text = (REPO / page).read_text()
        for m in _BLOCK.finditer(text):
            found.append(
                (f"{page}:{text[: m.start('body')].count(chr(10)) + 1}", m["body"], m["why"])
            )
    return found


def worker_module() -> str:
    """The README's ``myapp/tasks.py`` (the Python block its text says to save as that)."""
    after = (REPO / "README.md").read_text().split("`myapp/tasks.py`", 1)[1]
    match = _PYTHON.search(after)
    assert match and "worker = Worker(" in match[1], "no myapp/tasks.py block in the README"
    return match[1]


def script(body: str, address: str, ids: dict[str, str]) -> str:
    """The block as bash runs it: stand-ins filled in, long-running commands backgrounded."""
    text = body.replace("127.0.0.1:50051", address)
    for placeholder, value in ids.items():
        text = text.replace(placeholder, value)
    stop = "status=$?; kill $(jobs -p) 2>/dev/null || true; wait || true; exit $status"
    lines = ["set -euo pipefail", f"trap '{stop}' EXIT"]
    for line in text.replace("\\\n", " ").splitlines():
        command, _, comment = line.partition("  #")
        command = command.strip()
        if command.startswith(LONG_RUNNING):
            lines.append(f"{command} &")
        elif "(exits 1)" in comment:
            lines.append(f"{command} || [ $? -eq 1 ]")
        elif "(runs until Ctrl-C)" in comment:  # a stream: it must still run after a while
            lines.append(f"timeout {STREAM_SECONDS} {command} || [ $? -eq 124 ]")
        else:
            lines.append(line)
    return "\n".join(lines)


def test_every_block_runs_or_says_why_not() -> None:
    found = blocks()
    assert len(found) >= 15 and sum(why is None for _, _, why in found) >= 8
    for where, _, why in found:
        assert why is None or len(why.strip()) > 10, f"{where}: say why it is not run"
    assert "DSN" not in "".join(body for _, body, why in found if why is None)


async def test_readme_shell_blocks_run_against_conveyor_dev() -> None:
    # conveyor dev's default data directory, in a folder PostgreSQL's user can reach.
    folder = dev_data_dir()
    data_dir = folder / ".conveyor" / "dev"
    address = f"127.0.0.1:{free_port()}"
    try:
        async with dev_process(data_dir, address, cwd=folder) as dev:
            banner = await dev.read_until("Press Ctrl-C")
            key = (data_dir / "admin.key").read_text().strip()
            # Run here, its banner's commands find the key: none exports it, all work as
            # printed, from a folder under this one too.
            commands = banner_commands(banner)
            assert len(commands) == 4 and not any("export" in c for c in commands), banner
            assert f"elsewhere,\nexport CONVEYOR_API_KEY={key} first" in banner
            (folder / "myapp").mkdir()
            for command in commands:
                code, out = await shell(command, folder / "myapp")
                assert code == 0, f"{command}\n{out}"
            async with AsyncClient(address, api_key=key, timeout=10) as client:
                waiting = await client.submit("echo", "later", run_at=timedelta(hours=1))
                failing = await client.submit("fail", "readme", max_attempts=1)
                await client.wait(failing.id, timeout=30)
            async with grpc.aio.insecure_channel(address) as channel:
                revoked = await Keys(channel, key).create("shop", "read")
            ids = {
                "<dead task id>": failing.id,
                "<task id>": waiting.id,
                EXAMPLE_KEY_ID: revoked.id,
            }
            (folder / "myapp" / "tasks.py").write_text(
                worker_module().replace("127.0.0.1:50051", address)
            )
            path = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"
            exports: list[str] = [path, f"export CONVEYOR_COORDINATOR={address}"]
            runs = []
            for where, body, why in blocks():
                if why is not None:
                    continue
                prelude = "\n".join(exports)
                runs.append((where, shell(f"{prelude}\n{script(body, address, ids)}", folder, 90)))
                exports += [line for line in body.splitlines() if line.startswith("export ")]
            results = await asyncio.gather(*(run for _, run in runs))
            failed = [
                f"{where} (exit {code}):\n{out}"
                for (where, _), (code, out) in zip(runs, results, strict=True)
                if code != 0
            ]
            assert not failed, "\n\n".join(failed)
    finally:
        remove_dev_data(data_dir)
        shutil.rmtree(folder, ignore_errors=True)
