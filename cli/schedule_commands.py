"""``conveyor schedules create|list|get|pause|resume|delete``: cron schedules from the shell.

Times are printed in the schedule's own time zone, with the zone's name (``02:00:00 CET``):
that is the zone its cron expression is read in.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from conveyor.cli import output, values
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.client import CatchUpPolicy, Schedule


class Overlap(enum.StrEnum):
    allow = "allow"
    skip = "skip"
    buffer_one = "buffer-one"


class CatchUp(enum.StrEnum):
    skip = "skip"
    fire_once = "fire-once"
    fire_all = "fire-all"


def register(app: typer.Typer) -> None:
    """Adds ``conveyor schedules ...`` to ``app``."""
    group = make_app(
        "schedules",
        help="Cron schedules that submit a task at every tick.",
    )
    command(
        group,
        "create",
        example=[
            "conveyor schedules create nightly-report '0 2 * * *' send-report "
            '\'{"to": "ops"}\' --time-zone Europe/Berlin',
            "conveyor schedules create heartbeat '*/10 * * * * *' echo '\"beat\"'",
        ],
    )(create)
    command(group, "list", example="conveyor schedules list")(list_)
    command(group, "get", example="conveyor schedules get nightly-report")(get)
    command(group, "pause", example="conveyor schedules pause nightly-report")(pause)
    command(group, "resume", example="conveyor schedules resume nightly-report")(resume)
    command(group, "delete", example="conveyor schedules delete nightly-report")(delete)
    app.add_typer(group)


Name = Annotated[str, typer.Argument(metavar="NAME", help="The schedule's name.")]
AsJSON = Annotated[bool, typer.Option("--json", help="Print the schedule as JSON.")]


def create(
    name: Annotated[str, typer.Argument(help="Unique name, e.g. nightly-report.")],
    cron: Annotated[
        str,
        typer.Argument(
            help="5 fields, 6 with seconds first ('*/10 * * * * *'), or @hourly, @daily, ..."
        ),
    ],
    type: Annotated[str, typer.Argument(help="Task type each tick submits.")],
    payload: Annotated[str, typer.Argument(help="JSON payload of each task.")] = "null",
    time_zone: Annotated[
        str, typer.Option("--time-zone", help="IANA zone the cron is read in.")
    ] = "UTC",
    queue: Annotated[str, typer.Option("--queue", help="Queue of the tasks.")] = "default",
    priority: Annotated[
        int, typer.Option("--priority", parser=values.priority, help="Priority of the tasks.")
    ] = 0,
    max_attempts: Annotated[
        int | None,
        typer.Option("--max-attempts", parser=values.max_attempts, help="Attempts per task."),
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
    overlap: Annotated[
        Overlap,
        typer.Option("--overlap", case_sensitive=False, help="While the last firing runs."),
    ] = Overlap.allow,
    catch_up: Annotated[
        CatchUp,
        typer.Option("--catch-up", case_sensitive=False, help="Ticks missed while down."),
    ] = CatchUp.fire_once,
    catch_up_limit: Annotated[
        int | None,
        typer.Option(
            "--catch-up-limit",
            parser=values.catch_up_limit,
            help="Most missed ticks fire-all fires.",
        ),
    ] = None,
    start: Annotated[
        datetime | None,
        typer.Option("--start", metavar="ISO-TIME", parser=values.instant, help="No ticks before."),
    ] = None,
    end: Annotated[
        datetime | None,
        typer.Option(
            "--end", metavar="ISO-TIME", parser=values.instant, help="No ticks from then on."
        ),
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
    as_json: AsJSON = False,
    *,
    g: Globals,
) -> int:
    """Create a schedule: a task of TYPE with PAYLOAD at every tick of CRON."""
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise CLIError(f"the payload is not valid JSON ({exc})", code=USAGE) from None
    with g.client() as client:
        schedule = client.create_schedule(
            name,
            cron,
            type,
            value,
            time_zone=time_zone,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            overlap_policy=overlap.value,
            catch_up_policy=catch_up.value,
            catch_up_limit=catch_up_limit,
            start_time=start,
            end_time=end,
            paused=paused,
        )
    output.print_text(output.to_json(schedule) if as_json else schedule_detail(schedule))
    return 0


def list_(
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (1000).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the schedules as JSON.")] = False,
    *,
    g: Globals,
) -> int:
    """List schedules by name."""
    with g.client() as client:
        page = client.list_schedules(page_size=min(limit, 1000))
    if as_json:
        output.print_text(output.to_json(page.items))
    elif not page.items:
        output.print_text("no schedules")
    else:
        print_schedule_table(page.items)
    return 0


def get(name: Name, as_json: AsJSON = False, *, g: Globals) -> int:
    """Show a schedule, its next fire times and its last firings."""
    with g.client() as client:
        schedule = client.get_schedule(name)
    output.print_text(output.to_json(schedule) if as_json else schedule_detail(schedule))
    return 0


def pause(name: Name, *, g: Globals) -> int:
    """Stop a schedule firing (a paused schedule does not catch up on resume)."""
    with g.client() as client:
        schedule = client.pause_schedule(name)
    output.print_text(f"{schedule.name} paused")
    return 0


def resume(name: Name, *, g: Globals) -> int:
    """Start a paused schedule again, from now."""
    with g.client() as client:
        schedule = client.resume_schedule(name)
    zone = _zone(schedule)
    nxt = output.when(schedule.next_fire_times[0], zone) if schedule.next_fire_times else "never"
    output.print_text(f"{schedule.name} resumed; next fire time {nxt}")
    return 0


def delete(name: Name, *, g: Globals) -> int:
    """Delete a schedule (the tasks it submitted stay)."""
    with g.client() as client:
        client.delete_schedule(name)
    output.print_text(f"{name} deleted")
    return 0


def _zone(s: Schedule) -> ZoneInfo | None:
    try:
        return ZoneInfo(s.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        return None  # a zone this machine does not know: show local times, named


def _policy(value: Any) -> str:
    return str(value.value).lower().replace("_", "-")


def schedule_detail(s: Schedule) -> str:
    """The key: value block of one schedule; times in its own zone."""
    zone = _zone(s)
    lines = [
        f"name:         {s.name}",
        f"id:           {s.id}",
        f"cron:         {s.cron}   ({s.time_zone})",
        f"task:         {s.queue} / {s.type}   payload {s.payload.decode('utf-8', 'replace')}",
        f"overlap:      {_policy(s.overlap_policy)}",
        f"catch-up:     {_policy(s.catch_up_policy)}"
        + (f" (limit {s.catch_up_limit})" if s.catch_up_policy is CatchUpPolicy.FIRE_ALL else ""),
        f"state:        {'paused' if s.paused else 'active'}",
    ]
    if s.fault:
        lines.append(f"set aside:    {s.fault}")
    if s.start_time or s.end_time:
        lines.append(
            f"window:       {output.when(s.start_time, zone)} .. {output.when(s.end_time, zone)}"
        )
    lines.append(
        "next:         "
        + (", ".join(output.when(t, zone) for t in s.next_fire_times) or "none scheduled")
    )
    if s.recent_firings:
        lines.append("last firings:")
        width = max(len(output.when(f.tick_time, zone)) for f in s.recent_firings)
        for f in s.recent_firings:
            tick = output.when(f.tick_time, zone).ljust(width)
            if f.refused_limit:
                lines.append(f"  {tick}  refused: the tenant was over its {f.refused_limit}")
                continue
            lines.append(
                f"  {tick}  {f.task_id}  "
                f"{output.state_name(f.task_state).ljust(9)}  {_lag(f.tick_time, f.fire_time)}"
            )
    return "\n".join(lines)


def _lag(tick: datetime, fired: datetime | None) -> str:
    if fired is None:
        return "-"
    return f"lag {(fired - tick).total_seconds() * 1000:.0f} ms"


def print_schedule_table(schedules: Sequence[Schedule]) -> None:
    output.print_table(
        ["NAME", "CRON", "TIME ZONE", "TYPE", "QUEUE", "STATE", "NEXT"],
        [
            (
                s.name,
                s.cron,
                s.time_zone,
                s.type,
                s.queue,
                "paused" if s.paused else "active",
                output.when(s.next_fire_times[0], _zone(s)) if s.next_fire_times else "-",
            )
            for s in schedules
        ],
    )
