"""Dead letters, triaged: dead tasks grouped by type and error fingerprint (pure).

A group is what an operator redrives at once: the same task type failing the same way
(the fingerprint is the error's first line, ``Type: message``). Today the groups are made
here, from the page of dead tasks the console read (``ListTasks`` with state DEAD), so
their counts cover that page only and say so. Grouping every dead task of a tenant needs
the coordinator (a grouped query over the DEAD rows, and a bulk redrive by group): once it
has that RPC, :func:`group_page` is replaced by its answer, and the page and its template
stay as they are (:attr:`DeadGroup.complete` tells them which it is).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from conveyor.client import Task
from conveyor.console.present import error_view

__all__ = ["DeadGroup", "group_page"]

#: Task ids kept per group (for "retry this group" on the page shown).
SAMPLE = 100


@dataclass(frozen=True, slots=True)
class DeadGroup:
    """Dead tasks of one type that failed the same way."""

    type: str
    #: The error's first line (``Type: message``); empty when the task died without one.
    fingerprint: str
    count: int
    #: When the earliest and the latest of them died.
    first_seen: datetime | None
    last_seen: datetime | None
    #: The ids of (up to :data:`SAMPLE` of) its tasks, newest first.
    task_ids: tuple[str, ...]
    #: True when ``count`` covers every dead task of the group, False when it covers only
    #: the tasks read for the page (today, always False).
    complete: bool = False


def group_page(tasks: Iterable[Task]) -> list[DeadGroup]:
    """Groups a page of dead tasks; the largest groups first, then the most recent."""
    found: dict[tuple[str, str], list[Task]] = {}
    for task in tasks:
        error = error_view(task.last_error)
        found.setdefault((task.type, error.fingerprint if error else ""), []).append(task)
    groups = []
    for (type_, fingerprint), members in found.items():
        times = [t.finish_time or t.update_time for t in members]
        known = [t for t in times if t is not None]
        groups.append(
            DeadGroup(
                type=type_,
                fingerprint=fingerprint,
                count=len(members),
                first_seen=min(known) if known else None,
                last_seen=max(known) if known else None,
                task_ids=tuple(t.id for t in members[:SAMPLE]),
            )
        )
    groups.sort(key=lambda g: (-g.count, -(g.last_seen.timestamp() if g.last_seen else 0)))
    return groups
