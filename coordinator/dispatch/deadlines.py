"""Deadlines: a task not started by its ``deadline`` ends DEAD without running.

Dispatch order already serves deadlines: within a priority the earliest deadline first
(``store/tasks.py``, the ready index), and the claim never starts a task whose deadline
passed. What waits past its deadline, PENDING or SCHEDULED for a retry, is made DEAD by
the :class:`DeadlineSweeper` (a leader service), its ``last_error`` starting with
``DEADLINE_EXCEEDED``, counted in ``conveyor_tasks_deadline_exceeded_total``.

DEAD, not CANCELLED: CANCELLED is a decision someone made ("do not run this"); a missed
deadline is a failure to run the task in time, which belongs in the dead-letter queue,
where operators look, alert and redrive (a redriven task has no deadline). The sweep
reads the partial index ``tasks_deadline`` (waiting tasks with a deadline only) at most
once a second, sooner when the earliest deadline is nearer; with no deadlines it costs
one empty index probe a second.
"""

from __future__ import annotations

from datetime import UTC, datetime

from conveyor.coordinator.leader.maintenance import SWEEP_LIMIT
from conveyor.coordinator.lifecycle.transitions import Cause
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.supervisor import Service

MAX_SLEEP = 1.0
"""The longest the sweep waits: a task submitted meanwhile may have an earlier deadline."""


class DeadlineSweeper(Service):
    name = "deadline-sweeper"

    async def step(self) -> float:
        deps = self.deps
        async with deps.db.autocommit() as conn:
            rows = await store.expire_deadlines(conn, SWEEP_LIMIT, deps.office.fence())
            deps.after_commit.publish(Cause.DEADLINE_EXCEEDED, rows)
            if len(rows) == SWEEP_LIMIT:
                return 0.0
            earliest = await store.next_deadline(conn)
        if earliest is None or earliest.tzinfo is None:  # none, or infinite (never passes)
            return MAX_SLEEP
        wait = (earliest - datetime.now(UTC)).total_seconds()
        return max(0.0, min(MAX_SLEEP, wait))
