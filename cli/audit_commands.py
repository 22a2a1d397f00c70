"""``conveyor audit list|verify``: the tamper-evident audit log.

``verify`` reads every row (through the AdminService, or with ``--dsn`` from the
database) and checks the hash chain itself, here, with ``conveyor.coordinator.audit_chain``:
it does not take a coordinator's word for it. It names each row that was deleted or
edited, and prints the head (last row and its hash) to compare with one recorded earlier,
since cutting off the newest rows leaves no trace in the chain itself.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Annotated, Any

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import FAILURE
from conveyor.cli.keys_commands import AsJson, Dsn, on_database
from conveyor.cli.wire import admin_call

PAGE = 1000


def register(app: typer.Typer) -> None:
    """Adds ``conveyor audit ...`` to ``app``."""
    group = make_app("audit", help="The audit log: who did what, when, and did it work.")
    command(
        group, "list", example=["conveyor audit list", "conveyor audit list --tenant acme -n 200"]
    )(list_)
    command(
        group, "verify", example=["conveyor audit verify", 'conveyor audit verify --dsn "$DSN"']
    )(verify)
    app.add_typer(group)


def _page(g: Globals, tenant: str, newest_first: bool, size: int, token: str) -> Any:
    from conveyor.v1 import admin_service_pb2

    request = admin_service_pb2.ListAuditEventsRequest(
        tenant=tenant, newest_first=newest_first, page_size=size, page_token=token
    )

    async def call(admin: Any) -> Any:
        return await admin.ListAuditEvents(request)

    return admin_call(g, call)


def list_(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's rows.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=PAGE, help="Rows to show.")
    ] = 50,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Show the newest rows of the audit log, newest first."""
    from google.protobuf import json_format

    events = list(_page(g, tenant or "", True, limit, "").events)
    if as_json:
        rows = [json_format.MessageToDict(e, preserving_proto_field_name=True) for e in events]
        output.print_text(output.to_json({"events": rows}))
        return 0
    headers = ["SEQ", "TIME", "TENANT", "KEY", "ACTION", "TARGET", "OUTCOME", "PEER", "DETAIL"]
    output.print_table(
        headers,
        [
            [
                e.seq,
                output.when(e.time.ToDatetime(tzinfo=UTC)),
                e.tenant or "-",
                e.key_id or "-",
                e.action,
                e.target or "-",
                e.outcome,
                e.peer or "-",
                e.detail,
            ]
            for e in events
        ],
    )
    return 0


def _rows_through_api(g: Globals) -> list[Any]:
    from conveyor.coordinator.audit.chain import Event, Row
    from conveyor.v1 import admin_service_pb2

    async def call(admin: Any) -> list[Any]:
        # Every page on one channel, oldest first.
        events: list[Any] = []
        token = ""
        while True:
            request = admin_service_pb2.ListAuditEventsRequest(page_size=PAGE, page_token=token)
            page = await admin.ListAuditEvents(request)
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events

    rows: list[Any] = []
    for e in admin_call(g, call):
        event = Event(
            time=e.time.ToDatetime(tzinfo=UTC),
            tenant=e.tenant,
            key_id=e.key_id,
            action=e.action,
            target=e.target,
            outcome=e.outcome,
            peer=e.peer,
            request_id=e.request_id,
            detail=e.detail,
        )
        rows.append(Row(e.seq, event, bytes(e.prev_hash), bytes(e.hash)))
    return rows


def _verify_in_database(dsn: str) -> Any:
    from conveyor.coordinator.audit.chain import Verification, verify
    from conveyor.coordinator.store import audit as store

    async def work(conn: Any) -> Verification:
        rows = []
        after = 0
        while True:
            page = await store.page(conn, tenant=None, newest_first=False, after=after, limit=PAGE)
            rows.extend(page)
            if len(page) < PAGE:
                break
            after = page[-1].seq
        return await asyncio.to_thread(verify, rows)

    return on_database(dsn, work)


def verify(dsn: Dsn = None, *, g: Globals) -> int:
    """Check the audit log's hash chain: exit 0 when it is whole, 1 naming each row that was
    deleted or edited. Prints the head (last row and its hash): keep it, and compare it
    next time, to notice newest rows cut off."""
    from conveyor.coordinator.audit.chain import verify as check

    result = _verify_in_database(dsn) if dsn else check(_rows_through_api(g))
    for seq, problem in result.problems:
        output.print_text(f"row {seq}: {problem}")
    head = f"head: row {result.head_seq}, hash {result.head_hash.hex()}"
    if result.ok:
        output.print_text(f"audit log intact: {result.rows} rows; {head}")
        return 0
    output.print_text(
        f"audit log TAMPERED: {len(result.problems)} problem(s) in {result.rows} rows; {head}"
    )
    return FAILURE
