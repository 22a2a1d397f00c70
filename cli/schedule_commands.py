"""``conveyor schedules create|list|get|pause|resume|delete``: cron schedules from the shell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from conveyor.cli import output
from conveyor.cli.errors import CLIError
from conveyor.client import CatchUpPolicy, Client, OverlapPolicy, Schedule


def _choices(enum: Any) -> list[str]:
    return [m.name.lower().replace("_", "-") for m in enum if m.name != "UNSPECIFIED"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parent = sub.add_parser("schedules", help="cron schedules that submit a task at each tick")
    commands = parent.add_subparsers(dest="schedules_command", required=True, metavar="COMMAND")

    p = commands.add_parser("create", help="create a schedule")
    p.add_argument("name", help="unique name, e.g. nightly-report")
    p.add_argument(
        "cron",
        help="5 fields, 6 with seconds first ('*/10 * * * * *'), or @hourly, @daily, ...",
    )
    p.add_argument("type", help="task type each tick submits")
    p.add_argument("payload", nargs="?", default="null", help="JSON payload (default: null)")
    p.add_argument("--time-zone", default="UTC", help="IANA zone, e.g. Europe/Berlin")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="execution timeout")
    p.add_argument("--overlap", choices=_choices(OverlapPolicy), default="allow")
    p.add_argument("--catch-up", choices=_choices(CatchUpPolicy), default="fire-once")
    p.add_argument("--catch-up-limit", type=int, help="most missed ticks fire-all fires")
    p.add_argument("--start", type=_aware_time, metavar="ISO-TIME", help="no ticks before")
    p.add_argument("--end", type=_aware_time, metavar="ISO-TIME", help="no ticks from then on")
    p.add_argument("--paused", action="store_true", help="create it paused")
    p.add_argument("--json", action="store_true", help="print the schedule as JSON")
    p.set_defaults(run=_create)

    p = commands.add_parser("list", help="list schedules by name")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_list)

    p = commands.add_parser("get", help="show a schedule, its next fire times and last firings")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_get)

    for name, run, text in (
        ("pause", _pause, "stop a schedule firing"),
        ("resume", _resume, "start a paused schedule again, from now"),
        ("delete", _delete, "delete a schedule (its tasks stay)"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(run=run)


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2030-01-01T09:00:00+01:00"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset (or Z)")
    return value


def _client(args: argparse.Namespace) -> Client:
    return Client(args.coordinator, timeout=args.rpc_timeout)


def _create(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise CLIError(f"the payload is not valid JSON ({exc})", code=2) from None
    with _client(args) as client:
        schedule = client.create_schedule(
            args.name,
            args.cron,
            args.type,
            payload,
            time_zone=args.time_zone,
            queue=args.queue,
            priority=args.priority,
            max_attempts=args.max_attempts,
            timeout=args.timeout,
            overlap_policy=args.overlap,
            catch_up_policy=args.catch_up,
            catch_up_limit=args.catch_up_limit,
            start_time=args.start,
            end_time=args.end,
            paused=args.paused,
        )
    print(output.to_json(schedule) if args.json else schedule_detail(schedule))
    return 0


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_schedules(page_size=min(max(args.limit, 1), 1000))
    print(output.to_json(page.items) if args.json else schedule_table(page.items))
    return 0


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        schedule = client.get_schedule(args.name)
    print(output.to_json(schedule) if args.json else schedule_detail(schedule))
    return 0


def _pause(args: argparse.Namespace) -> int:
    with _client(args) as client:
        schedule = client.pause_schedule(args.name)
    print(f"{schedule.name} paused")
    return 0


def _resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        schedule = client.resume_schedule(args.name)
    nxt = _when(schedule.next_fire_times[0]) if schedule.next_fire_times else "never"
    print(f"{schedule.name} resumed; next fire time {nxt}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_schedule(args.name)
    print(f"{args.name} deleted")
    return 0


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _policy(value: Any) -> str:
    return str(value.value).lower().replace("_", "-")


def schedule_detail(s: Schedule) -> str:
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
    if s.start_time or s.end_time:
        lines.append(f"window:       {_when(s.start_time)} .. {_when(s.end_time)}")
    lines.append(
        "next:         " + (", ".join(_when(t) for t in s.next_fire_times) or "none scheduled")
    )
    if s.recent_firings:
        lines.append("last firings:")
        lines.append(
            output.table(
                ["  TICK", "TASK", "STATE", "LAG"],
                [
                    (
                        f"  {_when(f.tick_time)}",
                        f.task_id,
                        f.task_state.value,
                        _lag(f.tick_time, f.fire_time),
                    )
                    for f in s.recent_firings
                ],
            )
        )
    return "\n".join(lines)


def _lag(tick: datetime, fired: datetime | None) -> str:
    if fired is None:
        return "-"
    return f"{(fired - tick).total_seconds() * 1000:.0f} ms"


def schedule_table(schedules: Sequence[Schedule]) -> str:
    if not schedules:
        return "no schedules"
    return output.table(
        ["NAME", "CRON", "TIME ZONE", "TYPE", "QUEUE", "STATE", "NEXT"],
        [
            (
                s.name,
                s.cron,
                s.time_zone,
                s.type,
                s.queue,
                "paused" if s.paused else "active",
                _when(s.next_fire_times[0]) if s.next_fire_times else "-",
            )
            for s in schedules
        ],
    )
