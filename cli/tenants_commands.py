"""``conveyor tenants list|get|set``: each tenant's limits (quotas) and usage.

A limit is a number (0: no limit) or ``default`` (the coordinator's default for it, which
``tenants list`` shows). The dispatch weight (1 to 5, default 1) is the tenant's share of
dispatch while workers of several tenants wait. Limits are checked per submit call, on the
leader; a change applies within a second.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.cli.keys_commands import AsJson
from conveyor.cli.wire import admin_call

LIMITS = (
    "max_backlog", "submit_rate", "submit_burst", "max_payload_bytes", "max_schedules",
    "dispatch_weight",
)  # fmt: skip
_HEADERS = ["TENANT", "BACKLOG", "MAX BACKLOG", "SUBMIT RATE", "BURST", "MAX PAYLOAD",
            "SCHEDULES", "MAX SCHEDULES", "KEYS", "WEIGHT"]  # fmt: skip


def register(app: typer.Typer) -> None:
    """Adds ``conveyor tenants ...`` to ``app``."""
    group = make_app("tenants", help="Tenants: their limits (quotas) and usage.")
    command(group, "list", example="conveyor tenants list")(list_)
    command(group, "get", example="conveyor tenants get acme")(get)
    command(
        group,
        "set",
        example=[
            "conveyor tenants set acme --max-backlog 100000 --submit-rate 500 --submit-burst 2000",
            "conveyor tenants set acme --max-payload-bytes 65536 --max-schedules 50",
            "conveyor tenants set acme --submit-rate default",
            "conveyor tenants set acme --dispatch-weight 2",
        ],
    )(set_)
    app.add_typer(group)


def _limit(limits: Any, name: str) -> str:
    if not limits.HasField(name):
        return "default"
    value = getattr(limits, name)
    if not value:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _row(tenant: Any) -> list[object]:
    effective, usage = tenant.effective_limits, tenant.usage
    return [
        tenant.name,
        usage.backlog,
        _limit(effective, "max_backlog"),
        _limit(effective, "submit_rate"),
        _limit(effective, "submit_burst"),
        _limit(effective, "max_payload_bytes"),
        usage.schedules,
        _limit(effective, "max_schedules"),
        usage.active_keys,
        _limit(effective, "dispatch_weight"),
    ]


def _json(message: Any) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def list_(as_json: AsJson = False, *, g: Globals) -> int:
    """List the tenants (those with keys or limits of their own): limits in force, usage.

    "none" is no limit; the coordinator's defaults are shown first.
    """
    from conveyor.v1 import admin_service_pb2

    async def call(admin: Any) -> Any:
        return await admin.ListTenants(admin_service_pb2.ListTenantsRequest())

    reply = admin_call(g, call)
    if as_json:
        output.print_text(output.to_json(_json(reply)))
        return 0
    defaults = reply.default_limits
    output.print_text(
        "defaults: " + ", ".join(f"{name} {_limit(defaults, name)}" for name in LIMITS)
    )
    output.print_table(_HEADERS, [_row(t) for t in reply.tenants])
    return 0


def get(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The tenant.")],
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Show a tenant's limits (set for it, and in force) and usage."""
    from conveyor.v1 import admin_service_pb2

    async def call(admin: Any) -> Any:
        request = admin_service_pb2.GetTenantRequest(name=name)
        return (await admin.GetTenant(request)).tenant

    _print_tenant(admin_call(g, call), as_json)
    return 0


def _print_tenant(tenant: Any, as_json: bool) -> None:
    if as_json:
        output.print_text(output.to_json(_json(tenant)))
        return
    output.print_text(f"tenant {tenant.name}")
    rows = [
        [name, _limit(tenant.limits, name), _limit(tenant.effective_limits, name)]
        for name in LIMITS
    ]
    output.print_table(["LIMIT", "SET", "IN FORCE"], rows, indent=2)
    usage = tenant.usage
    output.print_text(
        f"  usage: {usage.backlog} unfinished tasks, {usage.schedules} schedules, "
        f"{usage.active_keys} active keys"
    )


def set_(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The tenant.")],
    max_backlog: Annotated[
        str | None,
        typer.Option("--max-backlog", metavar="N|default", help="Most unfinished tasks."),
    ] = None,
    submit_rate: Annotated[
        str | None,
        typer.Option("--submit-rate", metavar="N|default", help="Tasks submitted per second."),
    ] = None,
    submit_burst: Annotated[
        str | None,
        typer.Option("--submit-burst", metavar="N|default", help="Tasks at once over the rate."),
    ] = None,
    max_payload_bytes: Annotated[
        str | None,
        typer.Option("--max-payload-bytes", metavar="N|default", help="Largest payload."),
    ] = None,
    max_schedules: Annotated[
        str | None, typer.Option("--max-schedules", metavar="N|default", help="Most schedules.")
    ] = None,
    dispatch_weight: Annotated[
        str | None,
        typer.Option(
            "--dispatch-weight",
            metavar="1-5|default",
            help="Share of dispatch beside other tenants' workers (default 1).",
        ),
    ] = None,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Set some of a tenant's limits (0: no limit; default: the coordinator's default) or
    its dispatch weight (1 to 5); the others stay as they are."""
    from google.protobuf import field_mask_pb2

    from conveyor.v1 import admin_service_pb2, auth_pb2

    given = {
        "max_backlog": max_backlog,
        "submit_rate": submit_rate,
        "submit_burst": submit_burst,
        "max_payload_bytes": max_payload_bytes,
        "max_schedules": max_schedules,
        "dispatch_weight": dispatch_weight,
    }
    limits = auth_pb2.TenantLimits()
    paths: list[str] = []
    for field, text in given.items():
        if text is None:
            continue
        paths.append(field)
        if text.strip().lower() == "default":
            continue
        flag = "--" + field.replace("_", "-")
        try:
            value: float = float(text) if field == "submit_rate" else int(text)
        except ValueError:
            raise CLIError(f"{flag} {text!r} is not a number (or 'default')", USAGE) from None
        if value < 0:
            raise CLIError(f"{flag} must be 0 (no limit) or more, got {text}", USAGE)
        try:
            setattr(limits, field, value)
        except ValueError:  # past the field's int64 range
            raise CLIError(f"{flag} {text} is too large", USAGE) from None
    if not paths:
        raise CLIError("name at least one limit to set (see conveyor tenants set --help)", USAGE)
    request = admin_service_pb2.UpdateTenantLimitsRequest(
        tenant=name, limits=limits, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )

    async def call(admin: Any) -> Any:
        return (await admin.UpdateTenantLimits(request)).tenant

    _print_tenant(admin_call(g, call), as_json)
    return 0
