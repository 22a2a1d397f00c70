"""``conveyor queues pause|resume QUEUE``, ``conveyor dead list|groups|retry``,
``conveyor purge`` and ``conveyor workers drain``: queue operations, the dead-letter queue
and an operator's drain from the shell."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, NamedTuple

import typer

from conveyor.cli import output, values, wire
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.client import BulkResult
from conveyor.v1 import admin_service_pb2


class QueueAction(enum.StrEnum):
    """What ``conveyor queues ACTION QUEUE`` does to a queue."""

    pause = "pause"
    resume = "resume"


class DeadState(enum.StrEnum):
    """Finished states the dead-letter commands take (``--state``, repeatable)."""

    dead = "dead"
    cancelled = "cancelled"
    succeeded = "succeeded"


def pause_or_resume(g: Globals, action: QueueAction, queue: str | None) -> int:
    """``conveyor queues pause|resume QUEUE``."""
    if not queue:
        raise CLIError(f"conveyor queues {action} needs the queue's name", code=USAGE)
    with g.client() as client:
        if action is QueueAction.pause:
            stats = client.pause_queue(queue)
        else:
            stats = client.resume_queue(queue)
    state = "paused" if stats.paused else "dispatching"
    output.print_text(
        f"queue {stats.name} {state} "
        f"({output.tally(stats.pending, stats.pending_capped)} pending, {stats.running} running)"
    )
    return 0


def register(app: typer.Typer) -> None:
    """Adds ``conveyor dead ...`` to ``app``."""
    group = make_app("dead", help="The dead-letter queue: list, group and redrive dead tasks.")
    command(
        group,
        "list",
        example=["conveyor dead list --queue mail", "conveyor dead list --state cancelled"],
    )(list_)
    command(group, "groups", example="conveyor dead groups")(groups)
    command(
        group,
        "retry",
        example=[
            "conveyor dead retry 01890a5d-ac96-774b-bcce-b302099a8057",
            "conveyor dead retry --all --type send-email --fingerprint 'TimeoutError: smtp'",
        ],
    )(retry)
    app.add_typer(group)
    command(
        app,
        "purge",
        example=[
            "conveyor purge 01890a5d-ac96-774b-bcce-b302099a8057",
            "conveyor purge --all --state succeeded --before 2030-01-01T00:00:00Z",
        ],
    )(purge)
    workers = make_app("workers", help="Connected workers: drain one.")
    command(
        workers,
        "drain",
        example=[
            "conveyor workers drain host-1-4242",
            "conveyor workers drain host-1-4242 --tenant acme --reason 'kernel upgrade'",
        ],
    )(drain)
    app.add_typer(workers)


Queue = Annotated[str | None, typer.Option("--queue", help="Only this queue.")]
Type = Annotated[str | None, typer.Option("--type", help="Only this task type.")]
Fingerprint = Annotated[
    str | None,
    typer.Option(
        "--fingerprint", help="Only tasks whose last error's first line is this (dead groups)."
    ),
]
After = Annotated[
    datetime | None,
    typer.Option(
        "--after", parser=values.instant, metavar="TIME", help="Finished at or after (ISO 8601)."
    ),
]
Before = Annotated[
    datetime | None,
    typer.Option("--before", parser=values.instant, metavar="TIME", help="Finished before."),
]
States = Annotated[
    list[DeadState] | None,
    typer.Option(
        "--state", case_sensitive=False, help="Finished state to take (repeat; default dead)."
    ),
]
AsJSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _states(states: list[DeadState] | None) -> list[str] | None:
    return [s.value.upper() for s in states] if states else None


def list_(
    queue: Queue = None,
    type: Type = None,
    fingerprint: Fingerprint = None,
    after: After = None,
    before: Before = None,
    state: States = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (1000).")] = 20,
    as_json: AsJSON = False,
    *,
    g: Globals,
) -> int:
    """List dead tasks, newest first, with their last error."""
    with g.client() as client:
        found = client.list_dead(
            queue=queue,
            type=type,
            fingerprint=fingerprint,
            finished_after=after,
            finished_before=before,
            states=_states(state),
            page_size=min(limit, 1000),
        ).items
    if as_json:
        output.print_text(output.to_json(found))
        return 0
    if not found:
        output.print_text("no dead tasks match")
        return 0
    output.print_table(
        ["ID", "STATE", "QUEUE", "TYPE", "FINISHED", "LAST ERROR"],
        [
            (
                t.id,
                output.state_name(t.state),
                t.queue,
                t.type,
                output.when(t.finish_time),
                output.short((t.last_error or "").split("\n", 1)[0], 60),
            )
            for t in found
        ],
    )
    return 0


def groups(
    queue: Queue = None,
    type: Type = None,
    after: After = None,
    before: Before = None,
    state: States = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (1000).")] = 50,
    as_json: AsJSON = False,
    *,
    g: Globals,
) -> int:
    """Group dead tasks by type and error fingerprint (the error's first line), largest
    group first: what broke, how often, since when."""
    with g.client() as client:
        found = client.dead_groups(
            queue=queue,
            type=type,
            finished_after=after,
            finished_before=before,
            states=_states(state),
            limit=min(limit, 1000),
        )
    if as_json:
        output.print_text(output.to_json(found))
        return 0
    if not found:
        output.print_text("no dead tasks match")
        return 0
    output.print_table(
        ["COUNT", "TYPE", "FINGERPRINT", "FIRST SEEN", "LAST SEEN", "QUEUES"],
        [
            (
                grp.count,
                grp.type,
                output.short(grp.fingerprint, 80),
                output.when(grp.first_seen),
                output.when(grp.last_seen),
                ",".join(grp.queues),
            )
            for grp in found
        ],
    )
    return 0


def retry(
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Dead or cancelled task ids.")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Redrive every task the filter options match.")
    ] = False,
    queue: Queue = None,
    type: Type = None,
    fingerprint: Fingerprint = None,
    after: After = None,
    before: Before = None,
    state: States = None,
    max_tasks: Annotated[
        int, typer.Option("--max", min=1, max=100_000, help="At most this many per call.")
    ] = 10_000,
    *,
    g: Globals,
) -> int:
    """Redrive dead (and cancelled) tasks: by ids, or with --all every task the filter
    options match. Each runs again with a fresh set of attempts; a task redriven already
    is left alone, so repeating the command is safe."""
    filters = _Filters(queue, type, fingerprint, after, before, state, max_tasks)
    with g.client() as client:
        result = _bulk(client.retry_tasks, ids, all_, filters)
    output.print_text(bulk_text("redrove", result))
    return 0


def purge(
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Finished task ids.")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Delete every task the filter options match.")
    ] = False,
    queue: Queue = None,
    type: Type = None,
    fingerprint: Fingerprint = None,
    after: After = None,
    before: Before = None,
    state: States = None,
    max_tasks: Annotated[
        int, typer.Option("--max", min=1, max=100_000, help="At most this many per call.")
    ] = 10_000,
    *,
    g: Globals,
) -> int:
    """Delete finished tasks and their attempts: by ids, or with --all every task the
    filter options match (dead ones unless --state says otherwise). Unfinished tasks are
    never deleted. The coordinator's --retention-days does this by itself."""
    filters = _Filters(queue, type, fingerprint, after, before, state, max_tasks)
    with g.client() as client:
        result = _bulk(client.delete_tasks, ids, all_, filters)
    output.print_text(bulk_text("deleted", result))
    return 0


def drain(
    worker_id: Annotated[
        str, typer.Argument(metavar="ID", help="The worker's id (conveyor status lists them).")
    ],
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Its tenant, if another has the same id.")
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why; told to the worker, which logs it.")
    ] = None,
    *,
    g: Globals,
) -> int:
    """Drain a worker (admin): it is given no more tasks, finishes those it holds and
    exits (a worker of the Python SDK; an older one stays connected and idle)."""
    request = admin_service_pb2.DrainWorkerRequest(
        worker_id=worker_id, tenant=tenant or "", reason=reason or ""
    )
    reply: admin_service_pb2.DrainWorkerResponse = wire.admin_call(
        g, lambda admin: admin.DrainWorker(request)
    )
    worker = reply.worker
    output.print_text(
        f"worker {worker.worker_id} of tenant {worker.tenant} is draining "
        f"({worker.in_flight} task{'s' if worker.in_flight != 1 else ''} in flight)"
    )
    return 0


class _Filters(NamedTuple):
    """The filter options of ``dead retry`` and ``purge``."""

    queue: str | None
    type: str | None
    fingerprint: str | None
    after: datetime | None
    before: datetime | None
    state: list[DeadState] | None
    max_tasks: int


def _bulk(
    call: Callable[..., BulkResult], ids: list[str] | None, all_: bool, f: _Filters
) -> BulkResult:
    """``call`` (the client's retry_tasks or delete_tasks) by ids, or with --all by the
    filter options."""
    if bool(ids) == all_:
        raise CLIError("give task ids, or --all with filter options (not both)", code=USAGE)
    if ids:
        if any(f[:-1]):
            raise CLIError("filter options go with --all, not with task ids", code=USAGE)
        return call(ids)
    return call(
        queue=f.queue,
        type=f.type,
        fingerprint=f.fingerprint,
        finished_after=f.after,
        finished_before=f.before,
        states=_states(f.state),
        max_tasks=f.max_tasks,
    )


def bulk_text(verb: str, result: BulkResult) -> str:
    """What a bulk redrive or delete did, in one or a few lines."""
    lines = [f"{verb} {result.count} task{'s' if result.count != 1 else ''}"]
    if result.skipped_ids:
        lines.append(f"left alone (not in a state it takes): {' '.join(result.skipped_ids)}")
    if result.not_found_ids:
        lines.append(f"not found: {' '.join(result.not_found_ids)}")
    if result.more:
        lines.append("more tasks match: run the command again")
    return "\n".join(lines)
