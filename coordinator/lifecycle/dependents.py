"""Submits with dependencies: checking ``after``, writing tasks BLOCKED with their edges,
and settling dependencies that were already finished.

A group whose tasks list ``after`` (task ids) or ``after_refs`` (refs of tasks of the same
SubmitTasks request) takes the careful way of ``submits.py`` (one write transaction with
its look-ups); a group without them never reaches this module. In that transaction:

1. :func:`check_after`: every id in ``after`` must be a task of the group's tenant, or the
   group fails alone with NOT_FOUND naming it (another tenant's task is not told apart
   from a missing one);
2. :func:`block`: once the group is planned (every task has its id, a repeat its first
   task's), each new task with dependencies is written BLOCKED, with one edge per
   dependency;
3. :func:`write_edges`: the edges are written and counted, then the dependencies already
   finished are settled with the release the finishing statements run
   (``store/dependencies.py``): a dependent of finished tasks only is PENDING at once, one
   of a dead or cancelled task CANCELLED (per its policy), in the same transaction.

A resend of a DAG (the same request_ids or idempotency keys) meets its first tasks and
writes nothing: the fingerprint of a task with dependencies covers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from conveyor.coordinator.errors import ConveyorError, DependencyNotFound
from conveyor.coordinator.lifecycle.transitions import ID, STATE, Row
from conveyor.coordinator.store import dependencies
from conveyor.coordinator.store.dependencies import Edge
from conveyor.coordinator.store.tasks import BLOCKED, NewRow

if TYPE_CHECKING:
    from conveyor.coordinator.lifecycle.submits import SubmitGroup, SubmitResult


async def check_after(
    conn: asyncpg.Connection, groups: Sequence[SubmitGroup], failed: dict[int, ConveyorError]
) -> None:
    """Fails (in ``failed``, by position) each group that lists in ``after`` an id that is
    not a task of its tenant."""
    ids = sorted({d for g in groups if g.has_dependencies for t in g.tasks for d in t.after})
    if not ids:
        return
    found = await dependencies.states(conn, ids)
    for i, group in enumerate(groups):
        if not group.has_dependencies or i in failed:
            continue
        for task in group.tasks:
            missing = next((d for d in task.after if found.get(d, ("",))[0] != group.tenant), None)
            if missing is not None:
                failed[i] = DependencyNotFound(missing)
                break


def block(
    groups: Sequence[SubmitGroup],
    results: Sequence[SubmitResult | BaseException],
    rows: list[NewRow],
) -> tuple[list[NewRow], list[Edge]]:
    """The planned rows, those with dependencies made BLOCKED (and their answers), and
    the edges to write for them."""
    edges: list[Edge] = []
    blocked: set[str] = set()
    for group, result in zip(groups, results, strict=True):
        if not group.has_dependencies or isinstance(result, BaseException):
            continue
        by_ref = {t.ref: s.task.id for t, s in zip(group.tasks, result, strict=True) if t.ref}
        for task, submitted in zip(group.tasks, result, strict=True):
            if submitted.deduplicated or not task.has_dependencies:
                continue
            message = submitted.task
            after = dict.fromkeys((*task.after, *(by_ref[r] for r in task.after_refs)))
            cancel = not task.run_on_failure
            edges.extend(Edge(message.id, dep, group.tenant, cancel) for dep in after)
            message.state = BLOCKED
            blocked.add(message.id)
    if blocked:
        rows = [r._replace(state=BLOCKED) if str(r.id) in blocked else r for r in rows]
    return rows, edges


async def write_edges(
    conn: asyncpg.Connection,
    edges: Sequence[Edge],
    results: Sequence[SubmitResult | BaseException],
) -> list[Row]:
    """Writes the edges of the tasks inserted BLOCKED, then releases the dependents of
    the dependencies already finished; returns the transitions of those released (their
    answers are updated)."""
    if not edges:
        return []
    await dependencies.insert_edges(conn, edges)
    moved: list[Row] = await dependencies.release(conn, sorted({e.after_id for e in edges}))
    if moved:
        states = {row[ID]: row[STATE] for row in moved}
        for result in results:
            if isinstance(result, BaseException):
                continue
            for submitted in result:
                state = states.get(submitted.task.id)
                if state is not None and not submitted.deduplicated:
                    submitted.task.state = state
    return moved
