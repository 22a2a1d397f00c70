"""The audit log's appender: events from every call path, batched into the hash chain.

:class:`AuditLog` runs on every coordinator. Actions (key, schedule, cancel, retry, pause
and admin calls; ``api/interceptors/audit.py``) are recorded after they ran, with their outcome,
and the call waits for the append to commit (at most ``APPEND_WAIT``): so an answered
action is in the log, save an outage of the store, during which events wait in memory
(bounded) and are written when it is back.

Authentication failures are not written one row each, or a flood of bad keys would be a
flood of rows: they are counted per (peer address, problem, key) and written as one row
per ``AGGREGATE_WINDOW`` with ``detail`` ``count=N``. Permission refusals and calls
refused while a peer is throttled are aggregated the same way.

Appends are batched (everything queued, up to ``MAX_BATCH`` rows, per transaction) and
serialized across coordinators by the chain's lock (``store/audit.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.errors import is_store_error
from conveyor.coordinator.store import audit as store
from conveyor.coordinator.store.db import Database

_log = logging.getLogger("conveyor.coordinator.audit")

AGGREGATE_WINDOW = 1.0
"""Seconds over which aggregated events (authentication failures) are counted into one row."""
APPEND_WAIT = 5.0
"""Longest an audited call waits for its event to commit before answering anyway."""
MAX_BATCH = 500
MAX_QUEUED = 100_000
"""Events held while the store is unreachable; past it new events are counted as dropped
(and the count itself is written once the store is back)."""
BACKOFF_MAX = 5.0
STOP_TIMEOUT = 5.0

AUTHENTICATION_FAILED = "authentication_failed"
AUTHENTICATION_THROTTLED = "authentication_throttled"
PERMISSION_DENIED = "permission_denied"


@dataclass
class _Tally:
    event: Event
    count: int
    last: datetime


class AuditLog:
    """See the module docstring. ``start()`` on coordinator start, ``stop()`` at the end."""

    def __init__(self, db: Database, *, max_queued: int = MAX_QUEUED) -> None:
        self._db = db
        self._max_queued = max_queued
        self._queue: collections.deque[tuple[Event, asyncio.Future[bool] | None]] = (
            collections.deque()
        )
        self._tallies: dict[tuple[str, ...], _Tally] = {}
        self._window_end: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.dropped = 0
        """Events not recorded because the queue was full (since the last report)."""
        self.written = 0
        """Rows written by this coordinator."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-log")

    async def stop(self) -> None:
        """Writes what is queued (aggregates included) within STOP_TIMEOUT, then stops.

        The writer finishes by itself: cancelled in the middle of a write that committed,
        it would put the batch back and write it twice.
        """
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _, future in self._queue:
            if future is not None and not future.done():
                future.set_result(False)
        if self._queue:
            _log.error("%d audit events could not be written before stopping", len(self._queue))
        self._queue.clear()

    # -- recording ---------------------------------------------------------------------------

    def record(self, event: Event, *, wait: bool = True) -> asyncio.Future[bool] | None:
        """Queues an event; with ``wait``, a future that is True once it committed (False
        if it never will: dropped, or the coordinator stopped first). Never raises."""
        if len(self._queue) >= self._max_queued:
            self.dropped += 1
            if self.dropped == 1:
                _log.error("the audit queue is full (%d events): dropping events", len(self._queue))
            if not wait:
                return None
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(False)
            return done
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((event, future))
        self._wake.set()
        return future

    async def append(self, event: Event) -> bool:
        """Records an event and waits (at most APPEND_WAIT) until it committed."""
        future = self.record(event)
        assert future is not None
        try:
            async with asyncio.timeout(APPEND_WAIT):
                return await asyncio.shield(future)
        except TimeoutError:
            _log.warning("audit event %s not committed within %.0fs", event.action, APPEND_WAIT)
            return False

    def tally(self, event: Event) -> None:
        """Counts an event into its aggregate row (same action, peer, key, tenant, target
        and outcome within one AGGREGATE_WINDOW)."""
        key = (event.action, event.peer, event.key_id, event.tenant, event.target, event.outcome)
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self._max_queued:
                self.dropped += 1
                return
            self._tallies[key] = _Tally(event, 1, event.time)
        else:
            tally.count += 1
            tally.last = event.time
        if self._window_end is None:
            self._window_end = asyncio.get_running_loop().time() + AGGREGATE_WINDOW
            self._wake.set()

    # -- writing -----------------------------------------------------------------------------

    def _close_window(self) -> None:
        """Turns the tallies of the window into events in the queue."""
        self._window_end = None
        tallies, self._tallies = self._tallies, {}
        for tally in tallies.values():
            first = tally.event
            detail = f"count={tally.count}"
            if tally.count > 1:
                detail += f"; last {tally.last.astimezone(UTC).isoformat(timespec='milliseconds')}"
            if first.detail:
                detail += f"; {first.detail}"
            self._queue.append((Event.make(
                time=first.time, tenant=first.tenant, key_id=first.key_id, action=first.action,
                target=first.target, outcome=first.outcome, peer=first.peer,
                request_id=first.request_id, detail=detail,
            ), None))  # fmt: skip
        if self.dropped:
            self._queue.append(
                (
                    Event.make(
                        tenant="",
                        key_id="",
                        action="audit_events_dropped",
                        outcome="DROPPED",
                        detail=f"count={self.dropped}",
                    ),
                    None,
                )
            )
            self.dropped = 0

    async def _write_batch(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
        try:
            async with self._db.write() as conn:
                await store.append(conn, [event for event, _ in batch])
        except BaseException:
            self._queue.extendleft(reversed(batch))
            raise
        self.written += len(batch)
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            timeout = None if self._window_end is None else self._window_end - loop.time()
            if not self._queue and not self._stopping and (timeout is None or timeout > 0):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            if self._stopping or (self._window_end is not None and loop.time() >= self._window_end):
                self._close_window()
            try:
                while self._queue:
                    await self._write_batch()
                failures = 0
                if self._stopping:
                    return
            except Exception as exc:
                failures += 1
                delay = min(BACKOFF_MAX, 0.05 * 2**failures)
                if is_store_error(exc):
                    _log.warning(
                        "cannot write %d audit events (%s); retrying in %.2fs",
                        len(self._queue),
                        exc,
                        delay,
                    )
                else:
                    _log.exception("writing audit events failed (a bug); retrying in %.2fs", delay)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()  # stop() cuts the wait short
