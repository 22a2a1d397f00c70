"""An exclusive lock on a data directory, held for the life of the process that takes it.

``conveyor dev`` locks its data directory and :class:`~conveyor.embedded.EmbeddedPostgres`
locks the server's, so that a second process on the same folder is refused before it can
disturb the first. The lock is a ``flock()`` on a file inside the folder: the kernel drops
it when its holder exits, however it exits, so a stale file never blocks anyone. The
holder writes its pid (and a note, such as its listen address) into the file for the
message that refuses the next one.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DirectoryLock", "LockHolder"]


@dataclass(frozen=True)
class LockHolder:
    """What the holder of a lock wrote about itself (either may be missing)."""

    pid: int | None
    note: str


class DirectoryLock:
    """A non-blocking exclusive lock on the file ``path``.

    The descriptor is close-on-exec (Python's default), so child processes (pg_ctl, the
    postmaster it spawns) never inherit the lock and cannot hold it after their parent is
    gone. Locks of two objects in one process exclude each other too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, note: str = "") -> bool:
        """Takes the lock without waiting; False when someone else holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.update(note)
        return True

    def update(self, note: str) -> None:
        """Rewrites what the holder says about itself (after it learns its address, say)."""
        if self._fd is None:
            raise RuntimeError("update() needs the lock: call acquire() first")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n{note}\n".encode(), 0)

    def release(self) -> None:
        """Gives the lock up (closing the descriptor drops the flock). Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def holder(self) -> LockHolder:
        """Who holds the lock, as far as the file says (best effort: the holder may not have
        written yet, or may have just exited)."""
        try:
            first, _, rest = self.path.read_text().partition("\n")
        except OSError:
            return LockHolder(None, "")
        try:
            pid: int | None = int(first.strip())
        except ValueError:
            pid = None
        return LockHolder(pid, rest.strip())
