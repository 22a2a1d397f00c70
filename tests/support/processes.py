"""The one process harness of the tests, and the one free-port finder.

:class:`ManagedProcess` runs one child in its own process group (signals reach it and
nothing else), its output appended to ``log_path``. Coordinators and workers
(``cluster.py``) and etcd members (``etcd_servers.py``) are subclasses that say which
command to run. Starting never waits for readiness (subclasses add that); the blocking
waits are ``halt()`` (SIGTERM, SIGKILL after a timeout) and ``kill()`` (SIGKILL), with
``stop()`` as ``halt()`` off the event loop. Whatever a test leaves running is SIGKILLed
when the test process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

LOG_TAIL_CHARS = 4000

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
        """Waits for the process to end; TimeoutError after ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} still runs after {timeout}s")
            await asyncio.sleep(0.02)
        return code

    def pause(self) -> None:
        """SIGSTOP: frozen in place (sockets open, nothing answered); returns once stopped."""
        if not self.running:
            raise RuntimeError(f"cannot pause {self.name}: not running")
        self.signal(signal.SIGSTOP)
        self._paused = True
        self._wait_state(stopped=True)

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
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _proc_state(self.proc.pid)
            if state is None or (state in ("T", "t")) == stopped:
                return
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not {'stop' if stopped else 'continue'} in time")

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]
