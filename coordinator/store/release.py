"""The release of dependents, as SQL: the CTEs that ``store/transitions.py`` runs as a
fragment in every statement that finishes tasks, and ``store/dependencies.py`` as a
statement of its own (see that module for the rules). Apart from both so that
``transitions.py`` can build its fragments from it without importing them back.
"""

from __future__ import annotations

from conveyor.v1 import task_pb2

__all__ = ["IN_CHANGED", "release_ctes"]

_PENDING = task_pb2.TASK_STATE_PENDING
_SCHEDULED = task_pb2.TASK_STATE_SCHEDULED
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
_DEAD = task_pb2.TASK_STATE_DEAD
_CANCELLED = task_pb2.TASK_STATE_CANCELLED
_BLOCKED = task_pb2.TASK_STATE_BLOCKED
FINISHED = f"({_SUCCEEDED}, {_DEAD}, {_CANCELLED})"
"""The terminal states, as an SQL list."""

IN_CHANGED = "EXISTS (SELECT FROM changed c WHERE c.id = {})"
"""``busy`` for the fragment: the statement's own changed rows."""

# The BLOCKED dependents of task {} whose edge cancels them when it fails.
_DOOMED = f"""
    SELECT e.task_id FROM task_edges e
    WHERE e.after_id = {{}} AND e.cancel_on_failure
      AND (SELECT t.state FROM tasks t WHERE t.id = e.task_id) = {_BLOCKED}
"""


def release_ctes(finished: str, busy: str, returning: str) -> list[tuple[str, str]]:
    """The release as named CTEs: ``finished`` selects (id, state) of the tasks that
    finished; ``busy`` is a condition on ``{}`` (an id) true for tasks the statement
    itself changes, which the release must not write a second time; ``returning`` is
    what the moved rows return (``transitions.changed("d", from_state=BLOCKED)``)."""
    return [
        ("deps_finished", finished),
        (
            # The finished tasks, and the BLOCKED tasks a failure dooms down the chain
            # (edges that cancel on failure), which count as cancelled. The walk runs only
            # after a failure; each step looks the dependent's state up by primary key.
            "deps_gone",
            f"""
            SELECT id, state FROM deps_finished
            UNION ALL
            SELECT DISTINCT doom.id, {_CANCELLED}::smallint FROM (
                WITH RECURSIVE doom(id) AS (
                    SELECT x.task_id FROM deps_finished f
                    CROSS JOIN LATERAL ({_DOOMED.format("f.id")}) x
                    WHERE f.state <> {_SUCCEEDED}
                    UNION
                    SELECT x.task_id FROM doom
                    CROSS JOIN LATERAL ({_DOOMED.format("doom.id")}) x
                ) SELECT id FROM doom
            ) doom
            WHERE NOT ({busy.format("doom.id")})
            """,
        ),
        (
            "deps_fired",
            """
            DELETE FROM task_edges e WHERE e.after_id = ANY (ARRAY(SELECT id FROM deps_gone))
            RETURNING e.task_id, e.after_id, e.cancel_on_failure
            """,
        ),
        (
            "deps_hit",
            f"""
            SELECT f.task_id, count(*)::int AS n,
                min(f.after_id::text || CASE g.state WHEN {_DEAD} THEN ' ended DEAD'
                    ELSE ' was cancelled' END)
                    FILTER (WHERE g.id IS NOT NULL AND f.cancel_on_failure) AS doomed_by
            FROM deps_fired f
            -- Only the failures (usually none): a join of every fired edge with every
            -- finished task could be a nested loop over the two.
            LEFT JOIN (SELECT id, state FROM deps_gone WHERE state <> {_SUCCEEDED}) g
                ON g.id = f.after_id
            GROUP BY f.task_id
            """,
        ),
        (
            # deps_left and state are computed from the row as it is when the update takes
            # its lock: a concurrent release of the same task decremented it first.
            "deps_moved",
            f"""
            UPDATE tasks d SET
                deps_left = d.deps_left - h.n,
                state = CASE WHEN h.doomed_by IS NOT NULL THEN {_CANCELLED}
                    WHEN d.deps_left > h.n THEN {_BLOCKED}
                    WHEN d.run_at > now() THEN {_SCHEDULED} ELSE {_PENDING} END,
                run_at = CASE WHEN h.doomed_by IS NULL AND d.deps_left <= h.n
                    AND d.run_at <= now() THEN now() ELSE d.run_at END,
                finish_time = CASE WHEN h.doomed_by IS NOT NULL THEN now() END,
                last_error = CASE WHEN h.doomed_by IS NOT NULL
                    THEN 'cancelled: its dependency ' || h.doomed_by ELSE d.last_error END,
                update_time = now()
            FROM deps_hit h
            WHERE d.id = h.task_id AND d.state = {_BLOCKED} AND NOT ({busy.format("d.id")})
            RETURNING {returning}
            """,
        ),
        ("deps_released", f"SELECT * FROM deps_moved WHERE state <> {_BLOCKED}"),
    ]
