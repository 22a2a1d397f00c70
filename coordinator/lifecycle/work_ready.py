"""Work a follower committed, announced to the leader: PostgreSQL LISTEN/NOTIFY.

Every coordinator serves submits (``api/interceptors/leader.py``): an insert of a new task
needs no fence, since PostgreSQL is the truth and everything that leases, finishes or
moves a task afterwards is the leader's, fenced. The leader learns of its own submits
through its after-commit path (``transitions.py``: the dispatcher and the promoter
listen); a follower's commits reach it here instead:

- on a follower, the after-commit listener notes a committed batch that made a task
  ready (PENDING) or scheduled one (SCHEDULED, with the earliest ``run_at``), and the
  relay sends one NOTIFY on :data:`CHANNEL` for everything noted since the last (after
  the commit, from the relay's own connection: never a round trip in the submit's
  transaction, and under load one NOTIFY covers many commits);
- on the leader, the relay LISTENs on that channel on the same connection and wakes the
  dispatcher (``ready``) and tells the promoter when the earliest new task is due
  (``scheduled``). A notification from itself, or one reaching a follower, is ignored.

Nothing here is needed for correctness: the dispatcher polls every ``poll_interval``
and the promoter looks at least every second, so a NOTIFY lost with its connection (the
relay reconnects, backing off, and then wakes both at once, since notifications may
have been lost meanwhile) only costs pickup latency. One relay per coordinator for the
life of the process, so a newly elected leader listens already.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from conveyor.coordinator.deps import Office
from conveyor.coordinator.lifecycle.transitions import AfterCommit, Transitions
from conveyor.coordinator.store import task_events as store
from conveyor.coordinator.store.listener import listening, reconnecting
from conveyor.coordinator.supervisor import stop_task
from conveyor.v1 import task_pb2

_log = logging.getLogger("conveyor.coordinator.work_ready")

CHANNEL = "conveyor_work_ready"
NOTIFY_TIMEOUT = 5.0
"""Longest a NOTIFY may take before the connection is given up and opened again."""

_PENDING = task_pb2.TASK_STATE_PENDING
_SCHEDULED = task_pb2.TASK_STATE_SCHEDULED


class WorkReadyRelay:
    """A follower's NOTIFY, the leader's LISTEN (see the module docstring)."""

    def __init__(
        self,
        after_commit: AfterCommit,
        dsn: str,
        node_id: str,
        office: Office,
        *,
        ready: Callable[[], None],
        scheduled: Callable[[datetime], None],
    ) -> None:
        self._dsn = dsn
        self._node = node_id
        self._office = office
        self._ready = ready
        self._scheduled = scheduled
        self._pending = False
        """A task became ready here since the last NOTIFY."""
        self._earliest: datetime | None = None
        """The earliest run_at of the tasks scheduled here since the last NOTIFY."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        """Set while the relay's connection listens (for tests)."""
        self.sent = 0
        """NOTIFYs sent (for tests)."""
        self.received = 0
        """Notifications from other coordinators that woke this leader (for tests)."""
        after_commit.listen(self.on_transitions)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._relay(), name="work-ready")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    # -- a follower's side -------------------------------------------------------------------

    def on_transitions(self, batch: Transitions) -> None:
        """The after-commit listener: notes work a follower made ready or scheduled."""
        if self._office.leader:
            return  # the leader's own listeners have it
        noted = False
        if batch.entered(_PENDING):
            self._pending = noted = True
        run_at = batch.earliest_run_at(_SCHEDULED)
        # An infinite run_at reads as a naive datetime: never due, nothing to say.
        if run_at is not None and run_at.tzinfo is not None:
            if self._earliest is None or run_at < self._earliest:
                self._earliest = run_at
            noted = True
        if noted:
            self._wake.set()

    def _take(self) -> tuple[bool, datetime | None]:
        """What was noted since the last NOTIFY, forgotten here."""
        noted = (self._pending, self._earliest)
        self._pending, self._earliest = False, None
        return noted

    def _note_again(self, pending: bool, earliest: datetime | None) -> None:
        """Notes what a NOTIFY that may not have gone out said, to say it again."""
        self._pending = self._pending or pending
        if earliest is not None and (self._earliest is None or earliest < self._earliest):
            self._earliest = earliest
        self._wake.set()

    def _payload(self, pending: bool, earliest: datetime | None) -> str:
        message: dict[str, object] = {"n": self._node}
        if pending:
            message["p"] = 1
        if earliest is not None:
            message["r"] = earliest.timestamp()
        return json.dumps(message)

    # -- the leader's side -------------------------------------------------------------------

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if not self._office.leader:
            return
        try:
            message = json.loads(str(payload))
            if message.get("n") == self._node:
                return
            self.received += 1
            if message.get("p"):
                self._ready()
            if "r" in message:
                self._scheduled(datetime.fromtimestamp(float(message["r"]), UTC))
        except (ValueError, TypeError, AttributeError, OverflowError, OSError) as exc:
            _log.warning("ignored a malformed %s notification: %s", channel, exc)

    def _lost(self) -> None:
        self.listening.clear()
        if self._office.leader:
            # Notifications may have been lost with the connection: look now.
            self._ready()
            self._scheduled(datetime.now(UTC))

    # -- the relay ---------------------------------------------------------------------------

    async def _relay(self) -> None:
        await reconnecting(self._session, "the work-ready relay", after=self._lost)

    async def _session(self) -> None:
        channels = {CHANNEL: self._notified}
        async with listening(
            self._dsn, "conveyor-coordinator-work-ready", channels, on_lost=self._wake.set
        ) as (conn, lost):
            self.listening.set()
            while not lost.is_set():
                await self._wake.wait()
                self._wake.clear()
                pending, earliest = self._take()
                if not pending and earliest is None:
                    continue
                try:
                    async with asyncio.timeout(NOTIFY_TIMEOUT):
                        await store.notify(conn, [CHANNEL], [self._payload(pending, earliest)])
                except BaseException:
                    # Said again after the reconnect (it may not have gone out).
                    self._note_again(pending, earliest)
                    raise
                self.sent += 1
