"""Running the real ``conveyor`` command in tests: one-shot commands and ``conveyor dev``."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from processes import Completed, ManagedProcess, run
from testsupport import eventually

# The command as the tests run it: this interpreter, so the venv's packages are used.
CLI = [sys.executable, "-m", "conveyor.cli.main"]
# `conveyor dev` may need to initialise a cluster (initdb) on a busy machine.
DEV_START_TIMEOUT = 120.0


async def conveyor(
    *args: str, timeout: float = 60, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Completed:
    """Runs ``conveyor ARGS`` to completion and returns its exit code and output."""
    return await run([*CLI, *args], timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def dev_data_dir() -> Path:
    """A data directory for `conveyor dev`: outside pytest's basetemp on purpose (as root,
    PostgreSQL runs as another user, which must reach it; see conftest.make_pg_tmpdir)."""
    return Path(tempfile.mkdtemp(prefix="conveyor-test-dev-"))


class DevProcess(ManagedProcess):
    """A ``conveyor dev`` process (the one process harness); its output goes to a log file
    beside ``data_dir``, read back by :meth:`output`."""

    def __init__(self, data_dir: Path, address: str, *extra: str, cwd: Path | None = None) -> None:
        super().__init__("conveyor-dev", data_dir.parent, log_path=_dev_log(data_dir))
        self.data_dir = data_dir
        self.address = address
        self.extra = extra
        self.cwd = cwd

    def command(self) -> list[str]:
        data_dir = str(self.data_dir)
        return [*CLI, "dev", "--listen", self.address, "--data-dir", data_dir, *self.extra]

    def working_dir(self) -> Path | None:
        return self.cwd

    async def read_until(self, marker: str, timeout: float = DEV_START_TIMEOUT) -> str:
        """Waits until ``marker`` is in the output; fails if the process exits first."""

        def seen() -> str | None:
            output = self.output()
            if marker in output:
                return output
            assert self.running, f"conveyor dev exited early ({self.returncode}):\n{output}"
            return None

        return await eventually(seen, timeout=timeout, what=f"{marker!r} from conveyor dev")

    async def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C (SIGINT to its process group, as a terminal sends it); the exit code."""
        self.signal(signal.SIGINT)
        code = await self.wait_exit(timeout)
        self.close()  # reaped: nothing runs any more
        return code


@asynccontextmanager
async def dev_process(
    data_dir: Path, address: str, *extra: str, cwd: Path | None = None
) -> AsyncIterator[DevProcess]:
    """Starts ``conveyor dev`` (its output: ``.output()``); killed at exit if still running."""
    dev = DevProcess(data_dir, address, *extra, cwd=cwd).start()
    try:
        yield dev
    finally:
        dev.close()


def _dev_log(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".log")


def remove_dev_data(data_dir: Path) -> None:
    """Removes a dev data dir, first stopping a PostgreSQL a killed dev left running."""
    from conveyor.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(data_dir / "postgres")
    if pg.is_running():
        pg.stop(mode="immediate")
    shutil.rmtree(data_dir, ignore_errors=True)
    _dev_log(data_dir).unlink(missing_ok=True)


def banner_commands(output: str) -> list[str]:
    """The shell commands ``conveyor dev``'s banner prints (continuation lines joined)."""
    block = output.split("In another terminal", 1)[1].split("Press Ctrl-C", 1)[0]
    commands: list[str] = []
    current = ""
    for line in block.splitlines()[1:]:
        if not line.strip() or not line[0].isspace():  # a blank line, or the intro's
            continue
        current += line.strip() if not current else "\n" + line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


async def shell(command: str, cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Runs ``command`` with bash in ``cwd``; (exit code, stdout and stderr)."""
    done = await run(["bash", "-c", command], cwd=cwd, timeout=timeout, merge_stderr=True)
    return done.code, done.out
