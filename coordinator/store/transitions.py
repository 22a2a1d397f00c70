"""The one row shape of a task's state change, and the SQL every state change ends with.

Every statement of ``tasks.py`` that changes a task's state (inserts, the claim, results,
releases, reaping, promotion, cancel, redrive) is written as::

    WITH ..., changed AS (
        UPDATE tasks t SET ... RETURNING {changed(from_state=...)}
    ) {TAIL}

:func:`changed` names what the ``changed`` CTE returns, the same columns for every
statement: the task (id, tenant, queue, type), the state before and after, the attempt,
its lease epoch and worker, the attempt's outcome where one ended, ``run_at``, and the
timestamps the durations are computed from. :data:`TAIL` then runs every
same-transaction fragment on ``changed`` and returns :data:`COLUMNS`, one row per task
changed, in the shape the after-commit path (``lifecycle/transitions.py``) hands its
listeners. A statement that needs more columns for its own caller (the claim: what an
Assignment carries) names them with :func:`tail`.

A feature that must write in the same transaction as the state change (an outbox row per
transition, the release of a task's dependents) is one :class:`Fragment`: a CTE that reads
``changed``, added to :data:`FRAGMENTS`. It then runs inside every state-changing
statement, so no state change can commit without it (the webhook outbox,
``store/webhooks.py``)::

    WEBHOOK_EVENTS = Fragment("webhook_events", webhooks.OUTBOX_SQL, copyable=True)

A fragment marked ``finishing_only`` runs only in the statements that can finish a task
(reach SUCCEEDED, DEAD or CANCELLED: results, lease reaping, cancel, setting aside); the
others (inserts, the claim, promotion, redrive) are written with ``tail(finishes=False)``
and do not carry it. A fragment marked ``transitions`` changes other tasks' states (the
release of dependents): its CTE returns :func:`changed` columns, and the statement returns
those rows after its own, as transitions of the same shape. A fragment given ``over``
sees those moved rows too, after its own statement's (the outbox: a released dependent's
move is a transition like any other). The release's fragments are marked
``releases_dependents``: the result statement for tasks that no edge names
(``tasks.finish_attempts_plain``, the hot path) leaves them out with
``tail(dependents=False)``, since they would write nothing there.

The one statement that cannot carry a CTE, COPY, is used only while every fragment that
runs on inserts is ``copyable``: one that reads no more of ``changed`` than
:data:`COPY_COLUMNS`, which a COPY knows without reading anything back. ``tasks.copy_new``
then runs those fragments after the COPY, in its transaction, over those columns
(:func:`after_copy`), unless their gates say they have nothing to write for the COPY's
tenants (:func:`after_copy_gate`: one small query instead of the columns as arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from conveyor.coordinator.store import release, webhooks
from conveyor.v1 import task_pb2

__all__ = [
    "COLUMNS",
    "COPY_COLUMNS",
    "COPY_USABLE",
    "FRAGMENTS",
    "TAIL",
    "Fragment",
    "after_copy",
    "after_copy_gate",
    "changed",
    "select_transitions",
    "tail",
]


@dataclass(frozen=True)
class Fragment:
    """A write in the same statement as every state change: a CTE over ``changed``."""

    name: str
    sql: str
    finishing_only: bool = False
    """Runs only in statements that can finish a task (see the module docstring)."""
    transitions: bool = False
    """Its CTE returns :func:`changed` columns of tasks it moved: returned as transitions."""
    copyable: bool = False
    """Reads only :data:`COPY_COLUMNS` of ``changed``, so it can follow a COPY."""
    copy_gate: str = ""
    """For a copyable fragment: SQL true when it may write anything for the tenants
    ``:tenants`` (a text array), so a COPY whose tenants it has nothing for skips the
    statement and its arrays (empty: always run it)."""
    over: Callable[[str], str] | None = None
    """Its SQL over another source of :data:`COPY_COLUMNS` rows than ``changed``: given,
    the fragment also sees the rows earlier ``transitions`` fragments moved."""
    releases_dependents: bool = False
    """Part of the release of dependents (``release.py``): it writes nothing unless a task
    the statement finished has an edge in ``task_edges``, so a statement that finishes
    only tasks without edges may leave it out (``tail(dependents=False)``)."""


COPY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"), ("tenant", "text"), ("queue", "text"), ("type", "text"),
    ("from_state", "smallint"), ("state", "smallint"), ("attempt", "int"),
)  # fmt: skip
"""What a copyable (or ``over``) fragment may read of ``changed``, and the types
:func:`after_copy` takes them as (array parameters of these names)."""


COLUMNS = (
    "id", "tenant", "queue", "type", "from_state", "state", "attempt", "epoch",
    "worker_id", "outcome", "run_at", "queue_wait_seconds", "pickup_seconds", "run_seconds",
    "end_to_end_seconds",
)  # fmt: skip
"""A transition row, in this order (``lifecycle/transitions.py`` names the positions):

- ``id`` (canonical text), ``tenant``, ``queue``, ``type``;
- ``from_state`` (TASK_STATE_UNSPECIFIED for a task just inserted) and ``state``;
- ``attempt``, ``epoch`` (the ``lease_epoch`` column: the leader's epoch that granted the
  lease) and ``worker_id`` of the lease begun or ended (the worker that held it, for a
  lease that ended);
- ``outcome``: the AttemptOutcome of the attempt that ended, else NULL;
- ``run_at``;
- for the metrics, computed by the database (its clock, once per row of a statement that
  returns the row anyway; never negative, since some timestamps come from a coordinator's
  clock): ``queue_wait_seconds`` (ready to leased) and ``pickup_seconds`` (submit to the
  first lease of a task submitted ready to run) for a lease begun; ``run_seconds`` (lease
  start to now) for a lease ended; ``end_to_end_seconds`` (submit to now) for a task that
  reached SUCCEEDED or DEAD.
"""

_PENDING = task_pb2.TASK_STATE_PENDING
_BLOCKED = task_pb2.TASK_STATE_BLOCKED
_RUNNING = task_pb2.TASK_STATE_RUNNING
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
_DEAD = task_pb2.TASK_STATE_DEAD

_SINCE = "greatest(0, extract(epoch FROM now() - {}))::float8"


def changed(
    alias: str = "t",
    *,
    from_state: int | str,
    worker_id: str = "",
    outcome: int | str = "NULL",
) -> str:
    """What the ``changed`` CTE returns: the RETURNING list of a statement's write.

    ``from_state`` and ``outcome`` are SQL (a literal or an expression); ``worker_id``
    names the worker whose lease ended when the write already cleared the row's.
    """
    a = alias
    return (
        f"{a}.id, {a}.tenant, {a}.queue, {a}.type, ({from_state})::smallint AS from_state, "
        f"{a}.state, {a}.attempt, {a}.lease_epoch, {worker_id or f'{a}.worker_id'} AS worker_id, "
        f"({outcome})::smallint AS outcome, {a}.run_at, {a}.create_time, {a}.lease_start_time"
    )


def tail(
    extra: str = "", order: str = "", *, finishes: bool = True, dependents: bool = True
) -> str:
    """The end of a state-changing statement (see :data:`TAIL`), with ``extra`` columns
    after :data:`COLUMNS` and an ORDER BY; ``finishes`` False for a statement that never
    moves a task to SUCCEEDED, DEAD or CANCELLED (it skips ``finishing_only`` fragments);
    ``dependents`` False for one that finishes only tasks without edges (it skips the
    ``releases_dependents`` fragments)."""
    applied = [
        f
        for f in FRAGMENTS
        if (finishes or not f.finishing_only) and (dependents or not f.releases_dependents)
    ]
    moved: list[str] = []
    ctes: list[str] = []
    for f in applied:
        sql = f.sql
        if f.over is not None and moved:
            read = ", ".join(name for name, _ in COPY_COLUMNS)
            sources = " UNION ALL ".join(f"SELECT {read} FROM {n}" for n in ("changed", *moved))
            sql = f.over(f"({sources})")
        ctes.append(f", {f.name} AS ({sql})")
        if f.transitions:
            moved.append(f.name)
    fragments = "".join(ctes)
    if moved and order:
        raise ValueError("a statement with an ORDER BY must not carry a fragment that moves tasks")
    # The rows a fragment moved have no value for the statement's own extra columns.
    nulls = ", ".join("NULL" for _ in extra.split(",")) if extra else ""
    return "".join(
        [
            fragments,
            select_transitions("changed", extra),
            *(f" UNION ALL {select_transitions(name, nulls)}" for name in moved),
            f" ORDER BY {order}" if order else "",
        ]
    )


def select_transitions(source: str, extra: str = "") -> str:
    """``SELECT`` :data:`COLUMNS` (and ``extra``) ``FROM source``, a CTE of :func:`changed`
    columns: the transition rows a statement returns."""
    return f"""
    SELECT {source}.id::text AS id, tenant, queue, type, from_state, state, attempt,
        lease_epoch AS epoch, worker_id, outcome, run_at,
        CASE WHEN state = {_RUNNING} THEN {_SINCE.format("run_at")} END AS queue_wait_seconds,
        CASE WHEN state = {_RUNNING} AND attempt = 1 AND run_at <= create_time
            THEN {_SINCE.format("create_time")} END AS pickup_seconds,
        CASE WHEN from_state = {_RUNNING} AND state <> {_RUNNING}
            THEN {_SINCE.format("lease_start_time")} END AS run_seconds,
        CASE WHEN state IN ({_SUCCEEDED}, {_DEAD})
            THEN {_SINCE.format("create_time")} END AS end_to_end_seconds
        {f", {extra}" if extra else ""}
    FROM {source}
    """


FRAGMENTS: tuple[Fragment, ...] = (
    # The release of dependents (store/dependencies.py): every CTE finishing-only, the last
    # returning the tasks it moved.
    *(
        Fragment(
            name,
            sql,
            finishing_only=True,
            transitions=name == "deps_released",
            releases_dependents=True,
        )
        for name, sql in release.release_ctes(
            f"SELECT id, state FROM changed WHERE state IN {release.FINISHED}",
            release.IN_CHANGED,
            changed("d", from_state=_BLOCKED),
        )
    ),
    # An event per transition owed to each matching webhook subscription, the dependents
    # just released included.
    Fragment(
        "webhook_events",
        webhooks.OUTBOX_SQL,
        copyable=True,
        copy_gate=webhooks.GATE_SQL,
        over=webhooks.outbox_sql,
    ),
)
"""The same-transaction fragments, in the order they run."""

_ON_INSERTS = tuple(f for f in FRAGMENTS if not f.finishing_only)

COPY_USABLE = all(f.copyable for f in _ON_INSERTS)
"""COPY carries no CTE: it is used only while every fragment that runs on inserts can run
after it, over what the COPY wrote (:func:`after_copy`)."""


def after_copy() -> str | None:
    """The statement that runs the insert fragments for rows a COPY wrote (the array
    parameters of :data:`COPY_COLUMNS`), or None when there are none; only while
    :data:`COPY_USABLE`."""
    if not _ON_INSERTS:
        return None
    arrays = ", ".join(f":{name}::{kind}[]" for name, kind in COPY_COLUMNS)
    names = ", ".join(name for name, _ in COPY_COLUMNS)
    fragments = "".join(f", {f.name} AS ({f.sql})" for f in _ON_INSERTS)
    return f"""
    WITH changed AS (SELECT * FROM unnest({arrays}) AS c({names})){fragments}
    SELECT count(*) FROM changed
    """


def after_copy_gate() -> str | None:
    """A cheap statement that says whether :func:`after_copy` must run for a COPY's
    tenants (``:tenants``), or None when some fragment must always run."""
    gates = [f.copy_gate for f in _ON_INSERTS]
    if not gates or not all(gates):
        return None
    return "SELECT " + " OR ".join(f"({gate})" for gate in gates)


TAIL = tail()
"""The end of every state-changing statement: the fragments, then the transition rows."""

TAIL_NOT_FINISHING = tail(finishes=False)
"""The end of a state-changing statement that never finishes a task."""
