"""A task's state changes, and the one path they take after they commit.

Every statement that changes a task's state returns transition rows of one shape
(``store/transitions.py``: id, tenant, queue, type, the state before and after, attempt,
epoch, worker, outcome, run_at, the durations the metrics need). The code that
committed them hands the rows to :meth:`AfterCommit.publish` once per statement, as one
:class:`Transitions` batch with its :class:`Cause`; every registered listener then sees
the whole batch. That is the only place anything happens because a task changed state:
the watchers of WatchTask, the dispatcher's wake-up (work became ready), the promoter's
(a task was scheduled), the cancel sent to a worker, and the metrics are listeners.

A feature that reacts to state changes is one listener, registered once where it is
built::

    class Slots:
        def __init__(self, after_commit: AfterCommit) -> None:
            after_commit.listen(self.on_transitions)

        def on_transitions(self, batch: Transitions) -> None:
            for row in batch.left(RUNNING):          # a concurrency slot frees up
                self.free(row[TENANT], row[QUEUE])

Listeners run on the event loop, right after the commit and before the callers are
answered, once per batch: they must be quick and must not block (wake something up,
count, queue a message). The cost per batch is one call per listener; a listener that
needs nothing from a batch returns at once. What must be written in the same transaction
as the state change is not a listener but a fragment (``store/transitions.py``).

Rows are read by position (:data:`ID`, :data:`STATE`, ...): store rows are asyncpg
records, and the transitions of a COPY are tuples made in Python.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from conveyor.coordinator.store.transitions import COLUMNS
from conveyor.v1 import task_pb2

__all__ = [
    "COLUMNS",
    "AfterCommit",
    "Cause",
    "Listener",
    "Row",
    "Transitions",
    "split_released",
]

_log = logging.getLogger("conveyor.coordinator.transitions")

(
    ID,
    TENANT,
    QUEUE,
    TYPE,
    FROM_STATE,
    STATE,
    ATTEMPT,
    EPOCH,
    WORKER_ID,
    OUTCOME,
    RUN_AT,
    QUEUE_WAIT_SECONDS,
    PICKUP_SECONDS,
    RUN_SECONDS,
    END_TO_END_SECONDS,
) = range(len(COLUMNS))
"""The positions of :data:`COLUMNS` in a transition row."""

PENDING = task_pb2.TASK_STATE_PENDING
BLOCKED = task_pb2.TASK_STATE_BLOCKED
SCHEDULED = task_pb2.TASK_STATE_SCHEDULED
RUNNING = task_pb2.TASK_STATE_RUNNING
TERMINAL = frozenset(
    {task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_DEAD, task_pb2.TASK_STATE_CANCELLED}
)

Row = Any
"""A transition row: :data:`COLUMNS` by position (an asyncpg record, which names them
too, or a tuple the COPY of a submit made in Python)."""


class Cause(enum.Enum):
    """What made a batch of transitions (one statement's)."""

    SUBMITTED = "submitted"
    """New tasks (PENDING or SCHEDULED) from a submit."""
    FIRED = "fired"
    """New tasks from schedule ticks."""
    HANDED_OFF = "handed_off"
    """New tasks leased at once to waiting workers (RUNNING, first attempt)."""
    CLAIMED = "claimed"
    """PENDING tasks leased to a worker."""
    FINISHED = "finished"
    """Attempts a worker's result ended (SUCCEEDED, SCHEDULED for a retry, DEAD, or
    PENDING when the worker's drain interrupted it)."""
    EXPIRED = "expired"
    """Leases the reaper took back (PENDING, or DEAD on the last attempt)."""
    EVICTED = "evicted"
    """Leases taken back from an evicted worker (counted, as an expiry)."""
    TAKEN_OVER = "taken_over"
    """Leases of a worker id taken back when another process connected with it (counted,
    as an expiry: they may be running in the process that held them)."""
    NOT_STARTED = "not_started"
    """Leases that never reached their worker, given back without counting."""
    PROMOTED = "promoted"
    """SCHEDULED tasks whose run_at came (PENDING)."""
    CANCELLED = "cancelled"
    """A task cancelled (from PENDING, SCHEDULED or RUNNING)."""
    REDRIVEN = "redriven"
    """A DEAD task made PENDING again (RetryTask)."""
    SET_ASIDE = "set_aside"
    """Tasks a loop could not handle (a row written by hand), moved to DEAD."""
    RELEASED = "released"
    """BLOCKED tasks whose dependencies finished (PENDING or SCHEDULED), or that a dead or
    cancelled dependency cancelled: by the release fragment of the statement that finished
    them (published apart from that statement's own rows), or by a submit."""
    UPDATED = "updated"
    """A waiting task whose run_at UpdateTask moved across now (PENDING, SCHEDULED)."""


# The one state each cause leads to, where there is only one: a batch of these is not
# scanned to learn which states it reached.
_ONLY_STATE = {
    Cause.FIRED: PENDING,
    Cause.HANDED_OFF: RUNNING,
    Cause.CLAIMED: RUNNING,
    Cause.NOT_STARTED: PENDING,
    Cause.PROMOTED: PENDING,
    Cause.CANCELLED: task_pb2.TASK_STATE_CANCELLED,
    Cause.REDRIVEN: PENDING,
    Cause.SET_ASIDE: task_pb2.TASK_STATE_DEAD,
}


class Transitions:
    """The transitions one statement committed, and why.

    The questions listeners ask of a whole batch (:meth:`entered`, :meth:`earliest_run_at`)
    cost one pass over it at most, shared by every listener, and none for a cause that
    leads to one state only.
    """

    __slots__ = ("_reached", "cause", "rows")

    def __init__(self, cause: Cause, rows: Sequence[Row]) -> None:
        self.cause = cause
        self.rows = rows
        self._reached: frozenset[int] | None = None

    def reached(self) -> frozenset[int]:
        """The states the batch's tasks are in now."""
        if self._reached is None:
            only = _ONLY_STATE.get(self.cause)
            self._reached = (
                frozenset((only,)) if only is not None else frozenset(r[STATE] for r in self.rows)
            )
        return self._reached

    def entered(self, state: int) -> bool:
        """Whether some task of the batch reached ``state``."""
        return state in self.reached()

    def earliest_run_at(self, state: int) -> datetime | None:
        """The earliest ``run_at`` of the tasks that reached ``state``, if any did."""
        if state not in self.reached():
            return None
        earliest: datetime = min(row[RUN_AT] for row in self.rows if row[STATE] == state)
        return earliest

    def ids(self) -> Iterator[str]:
        return (row[ID] for row in self.rows)

    def left(self, state: int) -> list[Row]:
        """The rows of tasks that left ``state`` (for RUNNING: every lease that ended)."""
        return [row for row in self.rows if row[FROM_STATE] == state and row[STATE] != state]

    def finished(self) -> list[Row]:
        """The rows of tasks that reached a terminal state (SUCCEEDED, DEAD, CANCELLED)."""
        if self.reached().isdisjoint(TERMINAL):
            return []
        return [row for row in self.rows if row[STATE] in TERMINAL]


def split_released(cause: Cause, rows: Sequence[Row]) -> tuple[Sequence[Row], Sequence[Row]]:
    """A statement's own transitions, and those of the dependents its release fragment
    moved (``store/transitions.py``: they come last, each from BLOCKED). One comparison
    when there are none."""
    if not rows or rows[-1][FROM_STATE] != BLOCKED or cause is Cause.RELEASED:
        return rows, ()
    cut = len(rows)
    while cut > 1 and rows[cut - 1][FROM_STATE] == BLOCKED:
        cut -= 1
    if cut == 1 and rows[0][FROM_STATE] == BLOCKED and cause is not Cause.CANCELLED:
        cut = 0  # only a cancel's own row (its first) can have been BLOCKED
    return rows[:cut], rows[cut:]


Listener = Callable[[Transitions], None]
"""Told of every batch of transitions after it commits (see the module docstring)."""


class AfterCommit:
    """The one after-commit path: registered listeners, told of every committed batch."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Registers ``listener`` for every batch from now on."""
        self._listeners.append(listener)

    def publish(self, cause: Cause, rows: Sequence[Row]) -> None:
        """Hands the transitions one statement committed to every listener.

        A listener that raises is a bug: it is logged, and the others (and the caller,
        whose write did commit) carry on.
        """
        own, released = split_released(cause, rows)
        self._publish(cause, own)
        self._publish(Cause.RELEASED, released)

    def _publish(self, cause: Cause, rows: Sequence[Row]) -> None:
        if not rows:
            return
        batch = Transitions(cause, rows)
        for listener in self._listeners:
            try:
                listener(batch)
            except Exception:
                _log.exception("a transition listener (%r) failed on %s", listener, cause.name)
