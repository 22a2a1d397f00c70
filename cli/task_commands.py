"""``conveyor submit|get|tasks|queues|cancel|retry``: the client library from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import Any

from conveyor.cli import output
from conveyor.cli.errors import CLIError
from conveyor.client import Client, TaskState


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("submit", help="submit a task")
    p.add_argument("type", help="task type, e.g. echo")
    p.add_argument("payload", nargs="?", default="null", help="JSON payload (default: null)")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--delay", type=float, metavar="SECONDS", help="run no earlier than this")
    p.add_argument("--idempotency-key")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="execution timeout")
    p.add_argument("--wait", action="store_true", help="wait for the task to finish")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="print the task as JSON")
    p.set_defaults(run=_submit)

    p = sub.add_parser("get", help="show one task and its attempts")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_get)

    p = sub.add_parser("tasks", help="list tasks, newest first")
    p.add_argument("--queue")
    p.add_argument("--state", choices=[s.value for s in TaskState])
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_tasks)

    p = sub.add_parser("queues", help="task counts per queue")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_queues)

    p = sub.add_parser("cancel", help="cancel a task")
    p.add_argument("id")
    p.set_defaults(run=_cancel)

    p = sub.add_parser("retry", help="redrive a DEAD task")
    p.add_argument("id")
    p.set_defaults(run=_retry)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.coordinator, timeout=args.rpc_timeout)


def _parse_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CLIError(
            f"the payload is not valid JSON ({exc}); quote it for the shell, e.g. '\"hello\"'",
            code=2,
        ) from None


def _submit(args: argparse.Namespace) -> int:
    payload = _parse_payload(args.payload)
    with _client(args) as client:
        task = client.submit(
            args.type,
            payload,
            queue=args.queue,
            priority=args.priority,
            run_at=timedelta(seconds=args.delay) if args.delay else None,
            idempotency_key=args.idempotency_key,
            max_attempts=args.max_attempts,
            timeout=args.timeout,
        )
        if args.wait:
            print(f"submitted {task.id}; waiting for it to finish…", file=sys.stderr)
            task = client.wait(task.id, timeout=args.wait_timeout)
    if args.json:
        print(output.to_json(task))
    elif args.wait:
        print(output.task_detail(task))
    else:
        print(task.id)
    return 0 if task.state is not TaskState.DEAD else 1


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task, attempts = client.get_with_attempts(args.id)
    print(output.to_json(task) if args.json else output.task_detail(task, attempts))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(
            queue=args.queue, state=args.state, type=args.type, page_size=min(args.limit, 1000)
        )
    print(output.to_json(page.items) if args.json else output.task_table(page.items))
    return 0


def _queues(args: argparse.Namespace) -> int:
    with _client(args) as client:
        queues = client.queues()
    print(output.to_json(queues) if args.json else output.queue_table(queues))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.cancel(args.id)
    print(f"{task.id} {task.state.value}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.retry(args.id)
    print(f"{task.id} {task.state.value}")
    return 0
