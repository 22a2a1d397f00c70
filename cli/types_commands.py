"""``conveyor types set|get|list|delete``: task-type definitions, the defaults a submit
that leaves a field unset gets (queue, priority, max attempts, timeout, retry policy).

A change is answered once every coordinator's cache holds it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.keys_commands import AsJson
from conveyor.cli.wire import service_call

_HEADERS = ["TYPE", "QUEUE", "PRIORITY", "MAX ATTEMPTS", "TIMEOUT", "RETRY", "VERSION"]
TypeName = Annotated[str, typer.Argument(metavar="TYPE", help="The task type.")]


def register(app: typer.Typer) -> None:
    """Adds ``conveyor types ...`` to ``app``."""
    group = make_app("types", help="Task-type definitions: the defaults of submits by type.")
    command(
        group,
        "set",
        example=[
            "conveyor types set send-email --queue email --max-attempts 5 --timeout 30",
            "conveyor types set report --priority 10 --retry-initial 2 --retry-max 600",
        ],
    )(set_)
    command(group, "get", example="conveyor types get send-email")(get)
    command(group, "list", example="conveyor types list")(list_)
    command(group, "delete", example="conveyor types delete send-email")(delete)
    app.add_typer(group)


def _call(g: Globals, method: str, request: Any, *, idempotent: bool) -> Any:
    return service_call(g, "task_types", method, request, idempotent=idempotent)


def _row(t: Any) -> list[object]:
    retry = "-"
    if t.HasField("retry_policy"):
        p = t.retry_policy
        retry = (
            f"{p.initial_backoff.ToTimedelta().total_seconds():g}s x{p.multiplier:g} "
            f"<= {p.max_backoff.ToTimedelta().total_seconds():g}s, jitter {p.jitter:g}"
        )
    return [
        t.type,
        t.queue if t.HasField("queue") else "-",
        t.priority if t.HasField("priority") else "-",
        t.max_attempts if t.HasField("max_attempts") else "-",
        f"{t.timeout.ToTimedelta().total_seconds():g}s" if t.HasField("timeout") else "-",
        retry,
        t.version,
    ]


def _print(types: list[Any], as_json: bool) -> None:
    if as_json:
        from google.protobuf import json_format

        output.print_text(
            output.to_json(
                [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in types]
            )
        )
        return
    output.print_table(_HEADERS, [_row(t) for t in types])


def set_(
    task_type: TypeName,
    queue: Annotated[str | None, typer.Option("--queue", help="Default queue.")] = None,
    priority: Annotated[int | None, typer.Option("--priority", help="Default priority.")] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", help="Default attempts.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="SECONDS", help="Default timeout.")
    ] = None,
    retry_initial: Annotated[
        float | None,
        typer.Option("--retry-initial", metavar="SECONDS", help="Retry policy: first wait."),
    ] = None,
    retry_max: Annotated[
        float | None, typer.Option("--retry-max", metavar="SECONDS", help="...longest wait.")
    ] = None,
    retry_multiplier: Annotated[
        float | None, typer.Option("--retry-multiplier", help="...growth per attempt.")
    ] = None,
    retry_jitter: Annotated[
        float | None, typer.Option("--retry-jitter", help="...randomised fraction, 0 to 1.")
    ] = None,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Define TYPE's defaults (replacing its definition: options left out are not set)."""
    from conveyor.v1 import task_type_service_pb2

    message = task_type_service_pb2.TaskType(type=task_type)
    if queue is not None:
        message.queue = queue
    if priority is not None:
        message.priority = priority
    if max_attempts is not None:
        message.max_attempts = max_attempts
    if timeout is not None:
        message.timeout.FromNanoseconds(int(timeout * 1e9))
    retry = (retry_initial, retry_max, retry_multiplier, retry_jitter)
    if any(v is not None for v in retry):
        policy = message.retry_policy
        if retry_initial is not None:
            policy.initial_backoff.FromNanoseconds(int(retry_initial * 1e9))
        if retry_max is not None:
            policy.max_backoff.FromNanoseconds(int(retry_max * 1e9))
        policy.multiplier = retry_multiplier or 0.0
        policy.jitter = 0.2 if retry_jitter is None else retry_jitter
    request = task_type_service_pb2.SetTaskTypeRequest(task_type=message)
    reply = _call(g, "SetTaskType", request, idempotent=True)
    _print([reply.task_type], as_json)
    return 0


def get(task_type: TypeName, as_json: AsJson = False, *, g: Globals) -> int:
    """Show TYPE's definition."""
    from conveyor.v1 import task_type_service_pb2

    request = task_type_service_pb2.GetTaskTypeRequest(type=task_type)
    _print([_call(g, "GetTaskType", request, idempotent=True).task_type], as_json)
    return 0


def list_(as_json: AsJson = False, *, g: Globals) -> int:
    """List this tenant's task-type definitions."""
    from conveyor.v1 import task_type_service_pb2

    request = task_type_service_pb2.ListTaskTypesRequest()
    _print(list(_call(g, "ListTaskTypes", request, idempotent=True).task_types), as_json)
    return 0


def delete(task_type: TypeName, *, g: Globals) -> int:
    """Delete TYPE's definition (its submits get the coordinator's defaults again)."""
    from conveyor.v1 import task_type_service_pb2

    request = task_type_service_pb2.DeleteTaskTypeRequest(type=task_type)
    _call(g, "DeleteTaskType", request, idempotent=False)
    output.print_text(f"deleted the definition of {task_type}")
    return 0
