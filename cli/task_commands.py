"""``conveyor submit|get|tasks|queues|cancel|retry``: the client library from the shell."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any

import typer

from conveyor.cli import limits_commands, output, values
from conveyor.cli.app import Globals, command
from conveyor.cli.errors import USAGE, CLIError
from conveyor.cli.queue_commands import QueueAction, pause_or_resume
from conveyor.client import AsyncClient, RPCError, Task, TaskState

logger = logging.getLogger("conveyor.cli")

# The demo worker's types: for these, `conveyor worker --demo` is the worker to start.
DEMO_TYPES = ("echo", "sleep", "fail")
# How often `submit --wait` asks whether some worker serves the task: the first look comes
# soon (a worker that is connected takes the task within milliseconds), then it settles.
_UNSERVED_FIRST_CHECK = 0.5
_UNSERVED_INTERVAL = 2.0


class StateChoice(enum.StrEnum):
    """Task states as ``--state`` takes them (case does not matter)."""

    pending = "pending"
    scheduled = "scheduled"
    running = "running"
    succeeded = "succeeded"
    dead = "dead"
    cancelled = "cancelled"
    blocked = "blocked"


class DependencyFailure(enum.StrEnum):
    """What ``--on-dependency-failure`` takes."""

    cancel = "cancel"
    run = "run"


def register(app: typer.Typer) -> None:
    """Adds the task commands to ``app`` (the commands are registered at import)."""
    for name, fn, example in _COMMANDS:
        command(app, name, example=example)(fn)


def unserved_text(task: Task, encryption_key: str = "") -> str:
    """Why a waiting task does not run, and what to start so that it does
    (``encryption_key``: the key no connected worker that takes it holds)."""
    if encryption_key:
        return (
            f"no connected worker that serves type {task.type!r} on queue {task.queue!r} "
            f"holds encryption key {encryption_key!r}, which its payload is sealed with: "
            "the task waits until one does (add the key to the workers' key file: they "
            "reread it)"
        )
    hint = "conveyor worker --demo" if task.type in DEMO_TYPES else "conveyor worker MODULE:ATTR"
    if task.queue != "default":
        hint += f" --queues {task.queue}"
    return (
        f"no connected worker serves type {task.type!r} on queue {task.queue!r}: the task "
        f"waits until one connects (start one: {hint})"
    )


def _parse_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CLIError(
            f"the payload is not valid JSON ({exc}); quote it for the shell, e.g. '\"hello\"'",
            code=USAGE,
        ) from None


def submit(
    type: Annotated[str, typer.Argument(help="Task type, e.g. echo.", show_default=False)],
    payload: Annotated[str, typer.Argument(help="JSON payload; quote it for the shell.")] = "null",
    queue: Annotated[str, typer.Option("--queue", help="Queue to put it on.")] = "default",
    priority: Annotated[
        int, typer.Option("--priority", parser=values.priority, help="Higher runs first.")
    ] = 0,
    delay: Annotated[
        float | None,
        typer.Option(
            "--delay",
            metavar="DURATION",
            parser=values.delay,
            help="Run no earlier than this from now.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Submitting the same key again returns the task."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            "--max-attempts", parser=values.max_attempts, help="Attempts before it is dead (3)."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            parser=values.seconds(),
            help="Execution timeout of an attempt.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the task to finish.")] = False,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            "--wait-timeout",
            metavar="DURATION",
            parser=values.seconds(),
            help="Give up waiting after this (implies --wait).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the task as JSON.")] = False,
    after: Annotated[
        list[str] | None,
        typer.Option(
            "--after",
            metavar="TASK_ID",
            help="Run only after this task finished (repeat for several); waits BLOCKED.",
        ),
    ] = None,
    on_dependency_failure: Annotated[
        DependencyFailure,
        typer.Option(
            "--on-dependency-failure",
            case_sensitive=False,
            help="When a task of --after ends dead or cancelled: cancel this one, or run it.",
        ),
    ] = DependencyFailure.cancel,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            parser=values.label,
            help="A label to find the task by (repeat for several); conveyor tasks --label "
            "filters by it.",
        ),
    ] = None,
    *,
    g: Globals,
) -> int:
    """Submit a task and print its id.

    With --wait, wait for it to finish and print the outcome; the exit code is 1 when the
    task ends dead or cancelled. While it waits, it says so when no connected worker serves
    the task's type on its queue.
    """
    value = _parse_payload(payload)
    wait = wait or wait_timeout is not None
    task = asyncio.run(
        _submit(
            g,
            type,
            value,
            wait=wait,
            wait_timeout=wait_timeout,
            queue=queue,
            priority=priority,
            run_at=timedelta(seconds=delay) if delay else None,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            timeout=timeout,
            after=after or (),
            on_dependency_failure=on_dependency_failure.value,
            labels=values.labels(label) or None,
        )
    )
    if as_json:
        output.print_text(output.to_json(task))
    elif wait:
        output.print_text(task_detail(task))
    else:
        output.print_text(task.id)
    return 1 if task.state in (TaskState.DEAD, TaskState.CANCELLED) else 0


async def _submit(
    g: Globals, type: str, payload: Any, *, wait: bool, wait_timeout: float | None, **options: Any
) -> Task:
    async with g.async_client() as client:
        task = await client.submit(type, payload, **options)
        if not wait:
            return task
        return await _wait(client, g, task, wait_timeout)


async def _wait(client: AsyncClient, g: Globals, task: Task, wait_timeout: float | None) -> Task:
    """Waits for the task over WatchTask, saying so on stderr, and saying why when no
    connected worker serves it."""
    err = output.console(stderr=True)
    unserved = asyncio.Event()
    why_unserved = [""]  # the missing key, when that is why
    with _status(err, f"waiting for {task.id} ({output.state_name(task.state)})") as status:
        if not err.is_terminal:
            print(f"submitted {task.id}; waiting for it to finish…", file=sys.stderr, flush=True)
        checker = asyncio.create_task(_watch_unserved(g, task, unserved, why_unserved, status))
        last = task
        try:
            async with asyncio.timeout(wait_timeout):
                async for update in client.watch(task.id):
                    last = update
                    if status is not None:
                        status.update(f"waiting for {task.id} ({output.state_name(update.state)})")
                    if update.is_terminal:
                        return update
        except TimeoutError:
            why = f"; {unserved_text(last, why_unserved[0])}" if unserved.is_set() else ""
            raise CLIError(
                f"gave up waiting after {wait_timeout:g}s: task {task.id} is "
                f"{output.state_name(last.state)}{why}; it keeps going (conveyor get {task.id} "
                f"shows it, conveyor cancel {task.id} stops it)"
            ) from None
        finally:
            checker.cancel()
            try:
                await checker
            except asyncio.CancelledError:
                pass
            except Exception:
                # Only a hint failed to come; the wait's own outcome stands.
                logger.debug("checking whether a worker serves %s failed", task.id, exc_info=True)
    raise AssertionError("watch() ended before the task finished")  # pragma: no cover


@contextlib.contextmanager
def _status(err: Any, text: str) -> Iterator[Any]:
    """A spinner with ``text`` on a terminal; nothing (None) otherwise."""
    if not err.is_terminal:
        yield None
        return
    with err.status(text) as status:
        yield status


async def _watch_unserved(
    g: Globals, task: Task, unserved: asyncio.Event, why: list[str], status: Any
) -> None:
    """Looks now and then whether a worker serves the task; says so once when none does
    (``why[0]``: the encryption key none of them holds, when that is the reason)."""
    delay = _UNSERVED_FIRST_CHECK
    async with g.async_client() as client:
        while True:
            await asyncio.sleep(delay)
            delay = _UNSERVED_INTERVAL
            try:
                current = await client.get(task.id)
                now, why[0] = current.unserved, current.unserved_encryption_key
            except RPCError:
                continue  # the wait itself reports a coordinator that is gone
            if now and not unserved.is_set():
                unserved.set()
                message = f"note: {unserved_text(task, why[0])}"
                if status is not None:
                    status.console.print(message, markup=False)
                else:
                    print(message, file=sys.stderr, flush=True)
            elif not now:
                unserved.clear()


def get(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the task as JSON.")] = False,
    *,
    g: Globals,
) -> int:
    """Show one task and its attempts.

    A waiting task that no connected worker serves says so (and which worker to start).
    """
    with g.client() as client:
        task, attempts = client.get_with_attempts(task_id)
    if as_json:
        output.print_text(output.to_json(task))
    else:
        output.print_text(task_detail(task))
        if attempts:
            output.print_text("attempt history:")
            output.print_table(
                ["#", "WORKER", "STARTED", "ENDED", "OUTCOME", "ERROR"],
                [
                    (
                        a.attempt,
                        a.worker_id or "-",
                        output.when(a.start_time) if a.start_time else "-",
                        output.when(a.end_time) if a.end_time else "-",
                        a.outcome.value.lower().replace("_", " "),
                        output.short(a.error, 60) if a.error else "",
                    )
                    for a in attempts
                ],
                indent=2,
            )
    return 0


def task_detail(task: Task) -> str:
    """The key: value block of one task."""
    lines = [
        f"id:           {task.id}",
        f"state:        {output.state_name(task.state)}",
        f"queue/type:   {task.queue} / {task.type}",
        "attempts:     "
        + output.attempts_text(task.attempt, task.max_attempts, task.uncounted_attempts),
        f"priority:     {task.priority}",
        f"created:      {output.when(task.create_time)}",
        f"run at:       {output.when(task.run_at)}",
        f"finished:     {output.when(task.finish_time)}",
        f"payload:      {output.short(task.payload, 200)}",
    ]
    if task.unserved:
        lines.append(f"waiting:      {unserved_text(task, task.unserved_encryption_key)}")
    if task.waiting_for:
        lines.append(f"waits for:    {', '.join(task.waiting_for)}")
    if task.idempotency_key:
        lines.append(f"idempotency:  {task.idempotency_key}")
    if task.worker_id:
        lines.append(f"worker:       {task.worker_id}")
    if task.result:
        lines.append(f"result:       {output.short(task.result, 200)}")
    if task.last_error:
        lines.append(f"last error:   {task.last_error}")
    return "\n".join(lines)


def tasks(
    queue: Annotated[str | None, typer.Option("--queue", help="Only this queue.")] = None,
    state: Annotated[
        StateChoice | None,
        typer.Option("--state", case_sensitive=False, help="Only tasks in this state."),
    ] = None,
    type: Annotated[str | None, typer.Option("--type", help="Only this task type.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            parser=values.label,
            help="Only tasks with this label (repeat: with every one of them).",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (1000).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tasks as JSON.")] = False,
    *,
    g: Globals,
) -> int:
    """List tasks, newest first."""
    with g.client() as client:
        found = client.list(
            queue=queue,
            state=state.name.upper() if state is not None else None,
            type=type,
            labels=values.labels(label) or None,
            page_size=min(limit, 1000),
        ).items
    if as_json:
        output.print_text(output.to_json(found))
        return 0
    if not found:
        output.print_text("no tasks match")
        return 0
    # Dead tasks are listed to find out why they died: their last error says it.
    errors = any(t.state is TaskState.DEAD for t in found)
    output.print_table(
        [
            "ID",
            "STATE",
            "QUEUE",
            "TYPE",
            "ATTEMPTS",
            "CREATED",
            *(["LAST ERROR"] if errors else []),
        ],
        [
            (
                t.id,
                output.state_name(t.state),
                t.queue,
                t.type,
                output.attempts_text(t.attempt, t.max_attempts, t.uncounted_attempts),
                output.when(t.create_time),
                *([_error_line(t.last_error)] if errors else []),
            )
            for t in found
        ],
    )
    return 0


def _error_line(error: str | None) -> str:
    """The first line of an error (its class and message; the traceback is in get)."""
    return output.short(error.strip().splitlines()[0], 80) if error and error.strip() else "-"


def queues(
    action: Annotated[
        QueueAction | None,
        typer.Argument(help="pause or resume QUEUE (without: list the queues)."),
    ] = None,
    queue: Annotated[str | None, typer.Argument(metavar="[QUEUE]", help="The queue.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
    count_limit: Annotated[
        int,
        typer.Option(
            "--count-limit",
            min=0,
            help="Count each queue's pending, scheduled and dead tasks up to this many "
            "(shown as 10000+ beyond it); 0: the server's default, 10,000.",
        ),
    ] = 0,
    *,
    g: Globals,
) -> int:
    """Show task counts per queue and the connected workers that take from each; or pause
    a queue (it accepts submits, dispatches nothing, running tasks finish) or resume it.
    A count shown as N+ is at least N: the counts stop at a cap, so the call stays cheap
    however deep a queue is."""
    if action is not None:
        return pause_or_resume(g, action, queue)
    with g.client() as client:
        stats = client.queues(count_limit=count_limit)
        breakers = client.circuit_breakers()
    if as_json:
        rows = [
            {
                "name": q.name,
                "pending": q.pending,
                "scheduled": q.scheduled,
                "running": q.running,
                "dead": q.dead,
                "pending_capped": q.pending_capped,
                "scheduled_capped": q.scheduled_capped,
                "dead_capped": q.dead_capped,
                "workers": q.workers,
                "paused": q.paused,
                "rate_limits": [dataclasses.asdict(r) for r in q.rate_limits],
            }
            for q in stats
        ]
        output.print_text(json.dumps(rows, indent=2))
        return 0
    if not stats:
        output.print_text("no queues have tasks waiting, running or dead")
        return 0
    output.print_table(
        ["QUEUE", "PENDING", "SCHEDULED", "RUNNING", "DEAD", "PAUSED", "WORKERS"],
        [
            (
                q.name,
                output.tally(q.pending, q.pending_capped),
                output.tally(q.scheduled, q.scheduled_capped),
                q.running,
                output.tally(q.dead, q.dead_capped),
                _yes_no(q.paused),
                q.workers,
            )
            for q in stats
        ],
    )
    limited = [(q.name, q.rate_limits) for q in stats if q.rate_limits]
    for name, limits in limited:
        # Rate limits at dispatch (conveyor limits): tasks over the rate wait PENDING.
        output.print_text(f"rate limits of queue {name}:")
        output.print_table(limits_commands.HEADERS, limits_commands.rows(limits), indent=2)
    if breakers:
        # Types the leader holds back after too many failures (their tasks wait PENDING).
        output.print_text("circuit breakers not closed:")
        output.print_table(
            ["TYPE", "STATE", "OPENED"],
            [(b.type, b.state, output.when(b.opened_time)) for b in breakers],
            indent=2,
        )
    return 0


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    *,
    g: Globals,
) -> int:
    """Cancel an unfinished task (a running one's worker is told to stop)."""
    with g.client() as client:
        task = client.cancel(task_id)
    output.print_text(f"{task.id} {output.state_name(task.state)}")
    return 0


def retry(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The dead or cancelled task's id.")],
    *,
    g: Globals,
) -> int:
    """Redrive a dead or cancelled task: it runs again with a fresh set of attempts."""
    with g.client() as client:
        task = client.retry(task_id)
    output.print_text(f"{task.id} {output.state_name(task.state)}")
    return 0


_COMMANDS = (
    (
        "submit",
        submit,
        [
            "conveyor submit echo '\"hello\"' --wait",
            'conveyor submit send-email \'{"to": "ada@example.com"}\' --queue mail '
            "--idempotency-key welcome-ada",
        ],
    ),
    ("get", get, "conveyor get 01890a5d-ac96-774b-bcce-b302099a8057"),
    ("tasks", tasks, "conveyor tasks --state dead --queue default"),
    ("queues", queues, ["conveyor queues", "conveyor queues pause mail"]),
    ("cancel", cancel, "conveyor cancel 01890a5d-ac96-774b-bcce-b302099a8057"),
    ("retry", retry, "conveyor retry 01890a5d-ac96-774b-bcce-b302099a8057"),
)
