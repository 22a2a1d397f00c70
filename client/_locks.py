"""Named locks with fencing tokens (``LockService``), for applications and handlers.

A lock alone does not give mutual exclusion. A holder can be paused (a GC pause, a
SIGSTOP, a VM migration, a slow disk) past its TTL while it still believes it holds the
lock; meanwhile another process takes it. What keeps the protected resource safe is the
fencing token: every acquisition of a name gets a larger one, the holder sends it with
each write, and the resource refuses a write whose token is smaller than the largest it
has accepted (``conveyor.worker.pg_ledger.check_fencing_token`` does that in a
PostgreSQL transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from google.protobuf import duration_pb2

from conveyor.client._channel import Connection
from conveyor.transport._errors import LockNotHeldError, RPCError
from conveyor.v1 import effects_service_pb2 as pb

__all__ = ["Lock", "SyncLock"]

_log = logging.getLogger("conveyor.lock")


# Polling a held lock: at most this long between tries, however long its TTL has left
# (a holder that releases early frees it sooner).
_MAX_POLL = 0.5
_MIN_POLL = 0.02


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


class Lock:
    """One acquisition of a named lock: ``async with client.lock("reports", ttl=30) as lock``.

    Entering waits until the lock is free (up to ``timeout`` seconds, then
    :class:`TimeoutError`), takes it and renews it every third of its TTL while the block
    runs (``renew=False``: never, the lock then lasts ``ttl``); leaving releases it.
    Pass :attr:`fencing_token` with every write to the resource the lock protects, and
    have the resource refuse a token smaller than the largest it accepted: a paused
    holder can outlive its TTL while another holds the lock.

    Attributes:
        name: The lock's name (scoped by the API key's tenant).
        ttl: Seconds the lock lasts without renewal.
        fencing_token: This acquisition's token, larger than every earlier one of the name
            (0 before the lock is taken).
        lost: Set when a renewal found the lock gone (TTL ran out, another took it).
    """

    def __init__(
        self,
        connection: Connection,
        name: str,
        ttl: float,
        *,
        timeout: float | None = None,
        renew: bool = True,
    ) -> None:
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be positive seconds, got {ttl!r}")
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise ValueError(f"timeout must be seconds (0: try once) or None, got {timeout!r}")
        self._conn = connection
        self.name = name
        self.ttl = ttl
        self._timeout = timeout
        self._renew = renew
        self.fencing_token = 0
        self.lost = asyncio.Event()
        self._handle = b""
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> Self:
        """Waits until the lock is free and takes it (see the class docstring)."""
        if self._handle:
            raise RuntimeError(f"lock {self.name!r} is held by this object already")
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        request = pb.AcquireLockRequest(name=self.name, ttl=_duration(self.ttl))
        while True:
            # Not resent on an unknown outcome: a lock taken by a lost answer is free
            # again when its TTL runs out.
            response = await self._conn.unary(
                lambda s: s.locks.AcquireLock, request, idempotent=False
            )
            if response.acquired:
                break
            wait = min(
                max(response.retry_after.ToTimedelta().total_seconds(), _MIN_POLL), _MAX_POLL
            )
            if deadline is not None and loop.time() + wait > deadline:
                raise TimeoutError(
                    f"lock {self.name!r} is held by another holder; gave up after "
                    f"{self._timeout:g}s (its holder's TTL runs out within "
                    f"{response.retry_after.ToTimedelta().total_seconds():.3g}s)"
                )
            await asyncio.sleep(wait)
        self._handle = response.handle
        self.fencing_token = response.fencing_token
        self.lost.clear()
        if self._renew:
            self._renewer = loop.create_task(self._renew_loop(), name=f"conveyor-lock-{self.name}")
        return self

    async def renew(self) -> None:
        """Extends the lock by its TTL now.

        Raises:
            LockNotHeldError: The lock was lost (TTL ran out, another holder took it).
        """
        if not self._handle:
            raise RuntimeError(f"lock {self.name!r} is not held")
        request = pb.RenewLockRequest(name=self.name, handle=self._handle, ttl=_duration(self.ttl))
        try:
            await self._conn.unary(lambda s: s.locks.RenewLock, request, idempotent=True)
        except LockNotHeldError:
            self.lost.set()
            raise

    async def release(self) -> None:
        """Frees the lock (a lock already lost is not an error); stops renewing it."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        handle, self._handle = self._handle, b""
        if handle:
            request = pb.ReleaseLockRequest(name=self.name, handle=handle)
            await self._conn.unary(lambda s: s.locks.ReleaseLock, request, idempotent=True)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except LockNotHeldError:
                _log.warning(
                    "lock %r was lost (fencing token %d): its TTL ran out before a renewal",
                    self.name,
                    self.fencing_token,
                )
                return
            except Exception as exc:
                # The next renewal may get through before the TTL runs out.
                _log.warning("could not renew lock %r: %s", self.name, exc)

    async def __aenter__(self) -> Self:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.release()
        except RPCError as error:
            # Unreleased, the lock frees itself when its TTL runs out; the block's own
            # exception (if any) is the one the caller needs to see.
            _log.warning("could not release lock %r: %s", self.name, error)


class SyncLock:
    """The blocking twin of :class:`Lock` (``Client.lock``): ``with client.lock(...) as lk``.

    The lock lives on the blocking client's loop thread, which renews it while the block
    runs; :attr:`fencing_token` is the same, and so is the rule: pass it with every write.
    """

    def __init__(self, lock: Lock, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._lock = lock
        self._run = run

    @property
    def name(self) -> str:
        return self._lock.name

    @property
    def fencing_token(self) -> int:
        """This acquisition's token (0 before the lock is taken)."""
        return self._lock.fencing_token

    @property
    def lost(self) -> bool:
        """Whether a renewal found the lock gone."""
        return self._lock.lost.is_set()

    def acquire(self) -> Self:
        self._run(self._lock.acquire())
        return self

    def renew(self) -> None:
        self._run(self._lock.renew())

    def release(self) -> None:
        self._run(self._lock.release())

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run(self._lock.__aexit__(exc_type, exc, tb))
