"""``conveyor webhooks create|list|delete|deliveries|replay``: a tenant's webhooks.

Every state change of a matching task is POSTed to the subscription's URL, signed the
Standard Webhooks way (``conveyor.client.webhooks.WebhookReceiver`` verifies it), at
least once, retried with backoff. ``webhooks create`` prints the signing secret once.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.cli.keys_commands import AsJson
from conveyor.cli.wire import service_call

_STATUSES = ("pending", "delivered", "failed")


def register(app: typer.Typer) -> None:
    """Adds ``conveyor webhooks ...`` to ``app``."""
    group = make_app("webhooks", help="Webhooks: task state changes POSTed to your URL, signed.")
    command(
        group,
        "create",
        example=[
            "conveyor webhooks create https://hooks.example.com/conveyor",
            "conveyor webhooks create https://example.com/hook --state succeeded --state dead "
            "--queue billing",
        ],
    )(create)
    command(group, "list", example="conveyor webhooks list")(list_)
    command(group, "delete", example="conveyor webhooks delete WEBHOOK_ID")(delete)
    command(
        group,
        "deliveries",
        example=[
            "conveyor webhooks deliveries WEBHOOK_ID",
            "conveyor webhooks deliveries WEBHOOK_ID --status failed --limit 20",
        ],
    )(deliveries)
    command(
        group,
        "replay",
        example=[
            "conveyor webhooks replay WEBHOOK_ID msg_1042 msg_1043",
            "conveyor webhooks replay WEBHOOK_ID --failed",
        ],
    )(replay)
    app.add_typer(group)


def _call(g: Globals, method: str, request: Any, *, idempotent: bool) -> Any:
    return service_call(g, "webhooks", method, request, idempotent=idempotent)


def _json(message: Any) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _state_value(name: str) -> int:
    from conveyor.v1 import task_pb2

    names = task_pb2.TaskState.DESCRIPTOR.values_by_name
    key = "TASK_STATE_" + name.strip().upper()
    if key not in names or key == "TASK_STATE_UNSPECIFIED":
        known = ", ".join(
            k.removeprefix("TASK_STATE_").lower() for k in names if k != "TASK_STATE_UNSPECIFIED"
        )
        raise CLIError(f"--state {name!r}: not a task state; the states are {known}", code=USAGE)
    return int(task_pb2.TaskState.Value(key))


def _state_name(value: int) -> str:
    from conveyor.v1 import task_pb2

    try:
        return task_pb2.TaskState.Name(value).removeprefix("TASK_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def _filter_text(webhook: Any) -> str:
    parts = [
        f"{label} {','.join(values)}"
        for label, values in (
            ("states", [_state_name(s) for s in webhook.states]),
            ("queues", list(webhook.queues)),
            ("types", list(webhook.types)),
        )
        if values
    ]
    return "; ".join(parts) or "every state change"


def create(
    url: Annotated[str, typer.Argument(metavar="URL", help="Where to POST events (https).")],
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only changes to this state (repeat; default: all)."),
    ] = None,
    queue: Annotated[
        list[str] | None, typer.Option("--queue", help="Only tasks of this queue (repeat).")
    ] = None,
    task_type: Annotated[
        list[str] | None, typer.Option("--type", help="Only tasks of this type (repeat).")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option("--secret", help="The signing secret (whsec_...); default: a new one."),
    ] = None,
    description: Annotated[str, typer.Option("--description", help="A note for people.")] = "",
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Subscribe URL to task state changes; prints the signing secret (shown only now)."""
    from conveyor.v1 import webhook_service_pb2

    request = webhook_service_pb2.CreateWebhookRequest(
        url=url,
        secret=secret or "",
        states=[_state_value(s) for s in state or ()],  # type: ignore[misc]
        queues=queue or [],
        types=task_type or [],
        description=description,
    )
    webhook = _call(g, "CreateWebhook", request, idempotent=False).webhook
    if as_json:
        output.print_text(output.to_json(_json(webhook)))
        return 0
    output.print_text(f"webhook {webhook.id} -> {webhook.url} ({_filter_text(webhook)})")
    output.print_text(f"secret {webhook.secret}  (shown only now: verify deliveries with it)")
    return 0


def list_(as_json: AsJson = False, *, g: Globals) -> int:
    """List this tenant's webhook subscriptions."""
    from conveyor.v1 import webhook_service_pb2

    reply = _call(g, "ListWebhooks", webhook_service_pb2.ListWebhooksRequest(), idempotent=True)
    if as_json:
        output.print_text(output.to_json([_json(w) for w in reply.webhooks]))
        return 0
    rows = [
        [w.id, w.url, _filter_text(w), w.description, output.when(w.create_time.ToDatetime())]
        for w in reply.webhooks
    ]
    output.print_table(["ID", "URL", "FILTER", "DESCRIPTION", "CREATED"], rows)
    return 0


def delete(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
    *,
    g: Globals,
) -> int:
    """Delete a subscription, with its pending and past deliveries."""
    from conveyor.v1 import webhook_service_pb2

    request = webhook_service_pb2.DeleteWebhookRequest(id=webhook_id)
    _call(g, "DeleteWebhook", request, idempotent=False)
    output.print_text(f"deleted webhook {webhook_id}")
    return 0


def deliveries(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only pending, delivered or failed deliveries."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Most shown.")] = 50,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Show a subscription's deliveries, newest first: status, attempts, HTTP statuses."""
    from conveyor.v1 import webhook_service_pb2

    Delivery = webhook_service_pb2.WebhookDelivery
    wanted = Delivery.STATUS_UNSPECIFIED
    if status is not None:
        if status.lower() not in _STATUSES:
            raise CLIError(f"--status {status!r}: use one of {', '.join(_STATUSES)}", code=USAGE)
        wanted = Delivery.Status.Value("STATUS_" + status.upper())
    request = webhook_service_pb2.ListWebhookDeliveriesRequest(
        webhook_id=webhook_id,
        status=wanted,
        page_size=limit,
    )
    reply = _call(g, "ListWebhookDeliveries", request, idempotent=True)
    if as_json:
        output.print_text(output.to_json([_json(d) for d in reply.deliveries]))
        return 0
    rows = []
    for d in reply.deliveries:
        codes = " ".join(str(a.status_code or "-") for a in d.attempts) or "-"
        last = d.attempts[-1].error if d.attempts else ""
        rows.append(
            [
                d.id,
                d.task_id,
                f"{_state_name(d.from_state)}->{_state_name(d.state)}",
                Delivery.Status.Name(d.status).removeprefix("STATUS_"),
                codes,
                output.short(last, 50),
            ]
        )
    output.print_table(["ID", "TASK", "CHANGE", "STATUS", "HTTP", "LAST ERROR"], rows)
    return 0


def replay(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK_ID")],
    delivery_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[DELIVERY_ID]...", show_default=False)
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="Every delivery whose retries ran out.")
    ] = False,
    *,
    g: Globals,
) -> int:
    """Send deliveries again (same webhook-id, so receivers can tell), retried afresh."""
    from conveyor.v1 import webhook_service_pb2

    if not delivery_ids and not failed:
        raise CLIError("name deliveries (msg_...) or pass --failed", code=USAGE)
    request = webhook_service_pb2.ReplayWebhookDeliveriesRequest(
        webhook_id=webhook_id, delivery_ids=delivery_ids or [], all_failed=failed
    )
    reply = _call(g, "ReplayWebhookDeliveries", request, idempotent=False)
    output.print_text(f"replaying {reply.replayed} deliveries")
    return 0
