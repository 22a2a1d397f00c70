"""The CLI's AdminService calls, on the client library's connection layer.

Task reads and writes go through the client (``Globals.client()``, whose models carry
everything the CLI shows); what the client's methods do not make, the AdminService, goes
through the same connection layer (``conveyor.client._channel``: failover over
``--coordinator``'s addresses, the resends it allows, the API key on every call), so the
CLI has no failover loop of its own. Failures are the client's ``RPCError``, which the
CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from conveyor.cli.app import Globals
from conveyor.client import RPCError
from conveyor.client._channel import Connection
from conveyor.v1 import admin_service_pb2

T = TypeVar("T")


class Admin:
    """AdminService on a connection: ``await admin.ListTenants(request)``.

    Reads (``Get*``, ``List*``) are resent where the connection layer allows it; writes
    are never resent after a call that may have reached the coordinator.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __getattr__(self, method: str) -> Callable[[Any], Awaitable[Any]]:
        idempotent = method.startswith(("Get", "List"))

        async def call(request: Any) -> Any:
            return await self._conn.admin_unary(
                lambda stub: getattr(stub, method), request, idempotent=idempotent
            )

        return call


async def admin_async(g: Globals, call: Callable[[Admin], Awaitable[T]]) -> T:
    """``call(admin)`` on a connection to ``g``'s coordinators (every call on one)."""
    async with g.connection() as conn:
        return await call(Admin(conn))


def admin_call(g: Globals, call: Callable[[Admin], Awaitable[T]]) -> T:
    """:func:`admin_async` from synchronous code."""
    return asyncio.run(admin_async(g, call))


async def _status(admin: Admin) -> admin_service_pb2.GetClusterStatusResponse:
    response: admin_service_pb2.GetClusterStatusResponse = await admin.GetClusterStatus(
        admin_service_pb2.GetClusterStatusRequest()
    )
    return response


async def cluster_status(g: Globals) -> admin_service_pb2.GetClusterStatusResponse:
    """The cluster status, from the leader when a follower answered first (only the leader
    knows the workers)."""
    status = await admin_async(g, _status)
    leader = status.leader.address
    if leader and not status.answered_by.leader and leader not in g.addresses[:1]:
        try:
            return await admin_async(dataclasses.replace(g, coordinator=leader), _status)
        except RPCError:
            pass  # the follower's answer still says who leads; show that
    return status


def service_call(g: Globals, service: str, method: str, request: Any, *, idempotent: bool) -> Any:
    """One call of another service on the connection layer (``service`` names the stub:
    ``webhooks``, ``task_types``); reads (``idempotent``) are resent where allowed."""

    async def run() -> Any:
        async with g.connection() as conn:
            return await conn.unary(
                lambda s: getattr(getattr(s, service), method), request, idempotent=idempotent
            )

    return asyncio.run(run())
