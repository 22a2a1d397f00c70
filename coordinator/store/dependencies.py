"""SQL for task dependencies: the ``task_edges`` table and the release of dependents.

A task submitted with ``after`` is inserted BLOCKED, with one edge per dependency
(``task_edges``: the dependent, the dependency, the tenant, whether a dead or cancelled
dependency cancels it) and ``tasks.deps_left`` counting its edges.

The release (``release.py``) is a fragment of ``store/transitions.py``: in the same
statement as every state change that finishes tasks, it deletes the edges of the tasks
that finished (one statement per batch, by the ``task_edges_after`` index), decrements
their dependents' ``deps_left`` and moves those that reach 0 to PENDING (SCHEDULED when
their ``run_at`` is ahead), or CANCELLED at once when a dependency ended DEAD or CANCELLED
and the edge says so. A cancel cascades down a chain in the same statement: the tasks it
dooms are found by a recursive walk of the edges and count as cancelled dependencies of
theirs. The moved dependents are returned as transitions after the statement's own rows.

The counter lives on the dependent's row so that concurrent finishes of two of its
dependencies serialise on that row (the second decrement re-reads the first's). A submit
reads its dependencies' states without locking them, then :func:`release` settles the
dependencies that were already finished. One race remains: a dependency whose finishing
statement began before the submit committed and ends after it does not see the new
edge; the leader's :class:`~conveyor.coordinator.leader.maintenance.DependencySweeper`
releases such dependents within a sweep interval (:func:`finished_dependencies`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg

from conveyor.coordinator.store.release import FINISHED, release_ctes
from conveyor.coordinator.store.sql import Query
from conveyor.coordinator.store.transitions import changed, select_transitions
from conveyor.v1 import task_pb2

__all__ = [
    "Edge",
    "finished_dependencies",
    "insert_edges",
    "release",
    "states",
    "waiting_for",
]

_BLOCKED = task_pb2.TASK_STATE_BLOCKED


_RELEASE = Query(
    "release_dependents",
    "WITH "
    + ", ".join(
        f"{name} AS ({sql})"
        for name, sql in release_ctes(
            f"SELECT id, state FROM tasks WHERE id = ANY(:ids::uuid[]) AND state IN {FINISHED}",
            "false",
            changed("d", from_state=_BLOCKED),
        )
    )
    + select_transitions("deps_released"),
)


async def release(conn: asyncpg.Connection, ids: Sequence[str]) -> list[asyncpg.Record]:
    """Releases the dependents of those of ``ids`` that are finished (what the fragment
    does when a task finishes): for dependencies finished before their dependents' edges
    were written. Returns the transitions of the tasks moved (from BLOCKED)."""
    if not ids:
        return []
    return await _RELEASE.fetch(conn, ids=list(ids))


class Edge(NamedTuple):
    """``task_id`` waits for ``after_id``."""

    task_id: str
    after_id: str
    tenant: str
    cancel_on_failure: bool


_INSERT_EDGES = Query(
    "insert_task_edges",
    """
    WITH e AS (
        INSERT INTO task_edges (task_id, after_id, tenant, cancel_on_failure)
        SELECT * FROM unnest(:task_id::uuid[], :after_id::uuid[], :tenant::text[],
            :cancel::bool[])
    )
    -- The counts made by the caller; the tasks found by their primary key (a join alone
    -- lets the planner hash the whole table to find a batch).
    UPDATE tasks t SET deps_left = t.deps_left + c.n
    FROM unnest(:counted::uuid[], :counts::int[]) AS c(id, n)
    WHERE t.id = ANY(:counted::uuid[]) AND t.id = c.id
    """,
)


async def insert_edges(conn: asyncpg.Connection, edges: Sequence[Edge]) -> None:
    """Writes the edges (no pair twice) of tasks this transaction inserted BLOCKED, and
    counts them in ``deps_left``."""
    if edges:
        task_ids, after_ids, tenants, cancel = zip(*edges, strict=True)
        counts = Counter(task_ids)
        await _INSERT_EDGES.execute(
            conn,
            task_id=list(task_ids),
            after_id=list(after_ids),
            tenant=list(tenants),
            cancel=list(cancel),
            counted=list(counts),
            counts=list(counts.values()),
        )


_STATES = Query(
    "dependency_states",
    "SELECT id::text AS id, tenant, state FROM tasks WHERE id = ANY(:ids::uuid[])",
)


async def states(conn: asyncpg.Connection, ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """(tenant, state) of each of ``ids`` that exists, by id."""
    rows = await _STATES.fetch(conn, ids=list(ids))
    return {r["id"]: (r["tenant"], r["state"]) for r in rows}


_WAITING_FOR = Query(
    "waiting_for",
    """
    SELECT after_id::text FROM task_edges WHERE task_id = :id AND tenant = :tenant
    ORDER BY after_id
    """,
)


async def waiting_for(conn: asyncpg.Connection, tenant: str, task_id: str) -> list[str]:
    """The dependencies a BLOCKED task still waits for."""
    return [r[0] for r in await _WAITING_FOR.fetch(conn, tenant=tenant, id=task_id)]


_FINISHED_DEPENDENCIES = Query(
    "finished_dependencies",
    f"""
    SELECT DISTINCT e.after_id::text FROM task_edges e
    JOIN tasks x ON x.id = e.after_id AND x.state IN {FINISHED}
    LIMIT :limit
    """,
)


async def finished_dependencies(conn: asyncpg.Connection, limit: int) -> list[str]:
    """Finished tasks that still have edges: their dependents were not released (the
    submit race of the module docstring); :func:`release` them."""
    return [r[0] for r in await _FINISHED_DEPENDENCIES.fetch(conn, limit=limit)]
