"""The admin pages (admin keys only): tenants, API keys, the audit log and its check.

They read the AdminService through the signed-in user's own client, so only an admin key
sees them: any other key gets PERMISSION_DENIED from the coordinator, and the page says
so. Keys are listed as the API lists them, never with their secrets (the coordinator keeps
only their hashes). Verifying the audit log reads the whole log (oldest first, the API's
largest pages) and checks its hash chain here, as ``conveyor audit verify`` does, so it
runs only when asked (a POST), never as part of showing a page.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

from aiohttp import web

from conveyor.client import AsyncClient
from conveyor.console.web import STATE, ConsoleSession, action, page, render
from conveyor.coordinator.audit.chain import Event, Row, Verification, verify
from conveyor.v1 import admin_service_pb2, auth_pb2

__all__ = ["cluster_status", "routes", "scope_names"]

_AUDIT_PAGE = 1000
LIMITS = ("max_backlog", "submit_rate", "submit_burst", "max_payload_bytes", "max_schedules")


async def cluster_status(client: AsyncClient) -> admin_service_pb2.GetClusterStatusResponse:
    """GetClusterStatus (needs the admin scope)."""
    response: admin_service_pb2.GetClusterStatusResponse = await client._admin_read(
        lambda stub: stub.GetClusterStatus, admin_service_pb2.GetClusterStatusRequest()
    )
    return response


def scope_names(scopes: Any) -> list[str]:
    """``["read", "submit"]`` for the enum values of a key's scopes."""
    return [auth_pb2.Scope.Name(s).removeprefix("SCOPE_").lower() for s in scopes]


def _limits(limits: Any) -> dict[str, str]:
    """A tenant's limits as text (``-`` for a limit not set, ``none`` for 0)."""
    shown: dict[str, str] = {}
    for name in LIMITS:
        if not limits.HasField(name):
            shown[name] = "-"
            continue
        value = getattr(limits, name)
        if value == 0:
            shown[name] = "none"
        else:
            shown[name] = f"{value:,g}" if isinstance(value, float) else f"{value:,}"
    return shown


@page
async def tenants(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    response: admin_service_pb2.ListTenantsResponse = await session.client._admin_read(
        lambda stub: stub.ListTenants, admin_service_pb2.ListTenantsRequest()
    )
    rows = [
        {
            "name": t.name,
            "set": _limits(t.limits),
            "effective": _limits(t.effective_limits),
            "usage": t.usage,
        }
        for t in response.tenants
    ]
    return render(
        request,
        "admin_tenants.html",
        session,
        tenants=rows,
        defaults=_limits(response.default_limits),
    )


@page
async def keys(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    tenant = request.query.get("tenant", "").strip()
    inactive = request.query.get("inactive") == "1"
    token = request.query.get("page_token", "")
    response: admin_service_pb2.ListApiKeysResponse = await session.client._admin_read(
        lambda stub: stub.ListApiKeys,
        admin_service_pb2.ListApiKeysRequest(
            tenant=tenant,
            show_inactive=inactive,
            page_size=request.app[STATE].page_size,
            page_token=token,
        ),
    )
    return render(
        request,
        "admin_keys.html",
        session,
        keys=list(response.keys),
        scope_names=scope_names,
        state_name=lambda v: auth_pb2.ApiKeyState.Name(v).removeprefix("API_KEY_STATE_").lower(),
        filters={"tenant": tenant, "inactive": inactive},
        next_token=response.next_page_token,
        paged=bool(token),
    )


@page
async def audit(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    return await _audit_page(request, session, None)


async def _audit_page(
    request: web.Request, session: ConsoleSession, verification: Verification | None
) -> web.StreamResponse:
    tenant = request.query.get("tenant", "").strip()
    token = request.query.get("page_token", "")
    response: admin_service_pb2.ListAuditEventsResponse = await session.client._admin_read(
        lambda stub: stub.ListAuditEvents,
        admin_service_pb2.ListAuditEventsRequest(
            tenant=tenant,
            newest_first=True,
            page_size=request.app[STATE].page_size,
            page_token=token,
        ),
    )
    return render(
        request,
        "admin_audit.html",
        session,
        events=list(response.events),
        filters={"tenant": tenant},
        next_token=response.next_page_token,
        paged=bool(token),
        verification=verification,
    )


@action
async def verify_audit(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """Reads the whole audit log and checks its chain; the audit page shows the outcome."""
    rows: list[Row] = []
    token = ""
    while True:
        response: admin_service_pb2.ListAuditEventsResponse = await session.client._admin_read(
            lambda stub: stub.ListAuditEvents,
            admin_service_pb2.ListAuditEventsRequest(page_size=_AUDIT_PAGE, page_token=token),
        )
        rows.extend(_row(e) for e in response.events)
        token = response.next_page_token
        if not token:
            break
    # Hashing every row is CPU work: off the loop that serves every page.
    verification = await asyncio.to_thread(verify, rows)
    return await _audit_page(request, session, verification)


def _row(e: Any) -> Row:
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
    return Row(e.seq, event, bytes(e.prev_hash), bytes(e.hash))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/admin", tenants),
        web.get("/admin/keys", keys),
        web.get("/admin/audit", audit),
        web.post("/admin/audit/verify", verify_audit),
    ]
