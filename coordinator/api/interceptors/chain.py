"""The coordinator's gRPC server interceptors: the seam for cross-cutting concerns.

:func:`server_interceptors` is the chain, outermost first. Each concern is one module with
one :class:`~conveyor.coordinator.api.interceptors.base.BehaviorInterceptor`, and adding one
(authentication and tenants, metrics, tracing) is a new module plus one line here:

1. ``context``: binds the request context (request id, peer, deadline, trace context);
2. ``errors``: maps whatever escapes to the right status (so it sees the layers below);
3. ``auth``: checks the API key and the method's scope, and sets tenant, key id and
   scopes in the context (``auth.py``; its refusals are mapped by ``errors``;
   left out with authentication off);
4. ``leader``: followers refuse leader-only methods;
5. ``audit``: records key, schedule, cancel, retry, pause and admin calls with their
   outcome (``audit.py``).

The worker stream goes through the same chain. Before it, outermost, ``server.py`` puts
the telemetry's interceptors when they are on (``coordinator/telemetry.py``): the RPC
timer, so its time includes everything after it, then a span per RPC.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc.aio

from conveyor.coordinator.api.interceptors.audit import AuditInterceptor
from conveyor.coordinator.api.interceptors.auth import AuthInterceptor
from conveyor.coordinator.api.interceptors.context import ContextInterceptor
from conveyor.coordinator.api.interceptors.errors import ErrorInterceptor, Undecodable
from conveyor.coordinator.api.interceptors.leader import LeaderInterceptor

__all__ = ["Undecodable", "server_interceptors"]


def server_interceptors(
    *,
    is_leader: Callable[[], bool],
    leader_address: Callable[[], str],
    auth: AuthInterceptor | None = None,
    audit: AuditInterceptor | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptor chain of a coordinator, outermost first."""
    return [
        ContextInterceptor(),
        ErrorInterceptor(),
        *([auth] if auth is not None else []),
        LeaderInterceptor(is_leader, leader_address),
        *([audit] if audit is not None else []),
    ]
