"""Running the real ``conveyor`` command in tests: one-shot commands and ``conveyor dev``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

# The command as the tests run it: this interpreter, so the venv's packages are used.
CLI = [sys.executable, "-m", "conveyor.cli.main"]
# `conveyor dev` may need to initialise a cluster (initdb) on a busy machine.
DEV_START_TIMEOUT = 120.0


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def conveyor(
    *args: str, timeout: float = 60, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Result:
    """Runs ``conveyor ARGS`` to completion and returns its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None  # communicate() returned: the process has exited
    return Result(proc.returncode, out.decode(), err.decode())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_data_dir() -> Path:
    """A data directory for `conveyor dev`: outside pytest's basetemp on purpose (as root,
    PostgreSQL runs as another user, which must reach it; see conftest.make_pg_tmpdir)."""
    return Path(tempfile.mkdtemp(prefix="conveyor-test-dev-"))


class DevProcess:
    """A running ``conveyor dev`` whose output is collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address
        self.output = ""

    async def read_until(self, marker: str, timeout: float = DEV_START_TIMEOUT) -> str:
        """Reads output until ``marker`` appears; fails if the process exits first."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while marker not in self.output:
                line = await self.proc.stdout.readline()
                assert line, f"conveyor dev exited early:\n{self.output}"
                self.output += line.decode()
        return self.output

    async def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, then the rest of the output and the exit code."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(timeout):
            self.output += (await self.proc.stdout.read()).decode()
            return await self.proc.wait()


@asynccontextmanager
async def dev_process(
    data_dir: Path, address: str, *extra: str, cwd: Path | None = None
) -> AsyncIterator[DevProcess]:
    """Starts ``conveyor dev`` (output in ``.output``); killed at exit if still running."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "dev",
        "--listen",
        address,
        "--data-dir",
        str(data_dir),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    dev = DevProcess(proc, address)
    try:
        yield dev
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def remove_dev_data(data_dir: Path) -> None:
    """Removes a dev data dir, first stopping a PostgreSQL a killed dev left running."""
    from conveyor.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(data_dir / "postgres")
    if pg.is_running():
        pg.stop(mode="immediate")
    shutil.rmtree(data_dir, ignore_errors=True)


def banner_commands(output: str) -> list[str]:
    """The shell commands ``conveyor dev``'s banner prints (continuation lines joined)."""
    block = output.split("In another terminal", 1)[1].split("Press Ctrl-C", 1)[0]
    commands: list[str] = []
    current = ""
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        current += line.strip() if not current else "\n" + line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


async def shell(command: str, cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Runs ``command`` with bash in ``cwd``; (exit code, stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()
