"""``conveyor limits set|list|delete``: rate limits at dispatch.

A limit holds the tasks of a queue, a task type, or a type in one queue to a number of
starts a second across every worker (``--burst`` at once after a quiet spell). The leader
spends a token per task it dispatches; tasks over the rate wait PENDING. ``--all-tenants``
(admin keys) limits every tenant together.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Annotated

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.keys_commands import AsJson
from conveyor.client import RateLimit

Queue = Annotated[str, typer.Option("--queue", help="The queue it limits (default: every one).")]
Type = Annotated[str, typer.Option("--type", help="The task type it limits (default: every one).")]
AllTenants = Annotated[
    bool, typer.Option("--all-tenants", help="Every tenant together (needs an admin key).")
]
HEADERS = ["QUEUE", "TYPE", "RATE/S", "BURST", "TOKENS", "SCOPE"]


def register(app: typer.Typer) -> None:
    """Adds ``conveyor limits ...`` to ``app``."""
    group = make_app("limits", help="Rate limits at dispatch, per queue and task type.")
    command(
        group,
        "set",
        example=[
            "conveyor limits set --type send-email --rate 50 --burst 100",
            "conveyor limits set --queue mail --rate 1000",
            "conveyor limits set --type charge-card --rate 20 --all-tenants",
        ],
    )(set_)
    command(group, "list", example="conveyor limits list")(list_)
    command(group, "delete", example="conveyor limits delete --type send-email")(delete)
    app.add_typer(group)


def rows(limits: Iterable[RateLimit]) -> list[list[object]]:
    """The table rows of limits, for ``limits list`` and ``queues``."""
    return [
        [
            x.queue or "*",
            x.type or "*",
            f"{x.rate:g}",
            x.burst,
            f"{x.tokens:.1f}",
            "all tenants" if x.all_tenants else "tenant",
        ]
        for x in limits
    ]


def set_(
    rate: Annotated[float, typer.Option("--rate", help="Tasks started per second.")],
    queue: Queue = "",
    type_: Type = "",
    burst: Annotated[
        int, typer.Option("--burst", help="Tasks at once after a quiet spell (0: a second's).")
    ] = 0,
    all_tenants: AllTenants = False,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Set (create or replace) a rate limit."""
    with g.client() as client:
        limit = client.set_rate_limit(
            rate=rate, queue=queue, type=type_, burst=burst, all_tenants=all_tenants
        )
    if as_json:
        output.print_text(json.dumps(dataclasses.asdict(limit), indent=2))
    else:
        output.print_table(HEADERS, rows([limit]))
    return 0


def list_(as_json: AsJson = False, *, g: Globals) -> int:
    """List the rate limits that apply to this tenant (its own, then all tenants')."""
    with g.client() as client:
        limits = client.rate_limits()
    if as_json:
        output.print_text(json.dumps([dataclasses.asdict(x) for x in limits], indent=2))
    elif not limits:
        output.print_text("no rate limits (conveyor limits set adds one)")
    else:
        output.print_table(HEADERS, rows(limits))
    return 0


def delete(
    queue: Queue = "", type_: Type = "", all_tenants: AllTenants = False, *, g: Globals
) -> int:
    """Delete a rate limit (its tasks start as fast as workers take them again)."""
    with g.client() as client:
        client.delete_rate_limit(queue=queue, type=type_, all_tenants=all_tenants)
    output.print_text(f"deleted the rate limit of queue {queue or '*'} type {type_ or '*'}")
    return 0
