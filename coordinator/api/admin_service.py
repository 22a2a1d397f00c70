"""``AdminService``: what an operator asks the cluster (``conveyor status``) and tells a
worker (``DrainWorker``: ``conveyor workers drain``).

The methods for API keys, tenant limits and the audit log are
:class:`~conveyor.coordinator.api.security_admin.SecurityAdmin`'s; this class only routes them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api.security_admin import SecurityAdmin
from conveyor.coordinator.api.validation import MAX_NAME_LENGTH, check_text
from conveyor.coordinator.api.workers import in_flight, worker_info
from conveyor.coordinator.dispatch.sessions import SessionRegistry, WorkerSession
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    WorkerNotFound,
)
from conveyor.coordinator.leader.election import Member
from conveyor.coordinator.leader.leadership import ClusterView
from conveyor.coordinator.store.db import Database
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.admin")

_Context = grpc.aio.ServicerContext[Any, Any]
MAX_REASON_LENGTH = 1000


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        sessions: SessionRegistry,
        db: Database,
        *,
        view: Callable[[], ClusterView],
        replicas: Callable[[], Awaitable[list[Member]]],
        security: SecurityAdmin,
        paused: Callable[[], Iterable[tuple[str, str]]] = tuple,
    ) -> None:
        self._sessions = sessions
        self._paused = paused
        self._db = db
        self._view = view
        self._replicas = replicas
        self._security = security

    async def _in_flight(self, worker_ids: list[str]) -> dict[tuple[str, str], int]:
        return await in_flight(self._db, worker_ids)

    async def GetClusterStatus(
        self,
        request: admin_service_pb2.GetClusterStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_service_pb2.GetClusterStatusResponse:
        view = self._view()
        leader_id = view.leader.node_id if view.leader else ""

        def info(member: Member) -> admin_service_pb2.CoordinatorInfo:
            return admin_service_pb2.CoordinatorInfo(
                node_id=member.node_id, address=member.address, leader=member.node_id == leader_id
            )

        replicas = await self._replicas()
        sessions = list(self._sessions)
        in_flight = await self._in_flight([s.worker_id for s in sessions])
        return admin_service_pb2.GetClusterStatusResponse(
            cluster=view.cluster,
            mode=view.mode,
            leader=info(view.leader) if view.leader else None,
            epoch=view.epoch,
            replicas=[info(m) for m in sorted(replicas, key=lambda m: m.node_id)],
            workers=[worker_info(s, in_flight) for s in sessions],
            recent_evictions=[
                admin_service_pb2.WorkerEviction(
                    worker_id=e.worker_id,
                    hostname=e.hostname,
                    pid=e.pid,
                    reason=e.reason,
                    time=convert.timestamp_from_seconds(e.time),
                    released=e.released,
                )
                for e in self._sessions.evictions
            ],
            answered_by=info(view.me),
            paused_queues=[
                admin_service_pb2.PausedQueue(tenant=tenant, queue=queue)
                for tenant, queue in self._paused()
            ],
        )

    async def DrainWorker(
        self, request: admin_service_pb2.DrainWorkerRequest, context: _Context
    ) -> admin_service_pb2.DrainWorkerResponse:
        session = drain_worker(self._sessions, request)
        in_flight = await self._in_flight([session.worker_id])
        return admin_service_pb2.DrainWorkerResponse(worker=worker_info(session, in_flight))

    # -- keys, tenants, audit (SecurityAdmin's) ------------------------------------------------

    async def CreateApiKey(
        self, request: admin_service_pb2.CreateApiKeyRequest, context: _Context
    ) -> admin_service_pb2.CreateApiKeyResponse:
        return await self._security.create_api_key(request)

    async def ListApiKeys(
        self, request: admin_service_pb2.ListApiKeysRequest, context: _Context
    ) -> admin_service_pb2.ListApiKeysResponse:
        return await self._security.list_api_keys(request)

    async def RevokeApiKey(
        self, request: admin_service_pb2.RevokeApiKeyRequest, context: _Context
    ) -> admin_service_pb2.RevokeApiKeyResponse:
        return await self._security.revoke_api_key(request)

    async def GetTenant(
        self, request: admin_service_pb2.GetTenantRequest, context: _Context
    ) -> admin_service_pb2.GetTenantResponse:
        return await self._security.get_tenant(request)

    async def ListTenants(
        self, request: admin_service_pb2.ListTenantsRequest, context: _Context
    ) -> admin_service_pb2.ListTenantsResponse:
        return await self._security.list_tenants(request)

    async def UpdateTenantLimits(
        self, request: admin_service_pb2.UpdateTenantLimitsRequest, context: _Context
    ) -> admin_service_pb2.UpdateTenantLimitsResponse:
        return await self._security.update_tenant_limits(request)

    async def ListAuditEvents(
        self, request: admin_service_pb2.ListAuditEventsRequest, context: _Context
    ) -> admin_service_pb2.ListAuditEventsResponse:
        return await self._security.list_audit_events(request)


def drain_worker(
    sessions: SessionRegistry, request: admin_service_pb2.DrainWorkerRequest
) -> WorkerSession:
    """An operator's drain: the session gets no more work (``draining``, as when the
    worker sends Drain itself) and is told to drain and exit (``ConnectResponse.drain``).
    Not remembered past the session: a worker that reconnects anyway (an SDK that does
    not know the message, after a broken stream) takes work again."""
    out: list[FieldViolation] = []
    check_text(request.worker_id, "worker_id", out, max_length=MAX_NAME_LENGTH)
    if not request.worker_id:
        out.append(FieldViolation("worker_id", "must not be empty"))
    check_text(request.tenant, "tenant", out, max_length=MAX_NAME_LENGTH)
    check_text(request.reason, "reason", out, max_length=MAX_REASON_LENGTH, identifier=False)
    if out:
        raise InvalidArgument(out)
    found = [
        s
        for s in sessions
        if not s.closed
        and s.worker_id == request.worker_id
        and (not request.tenant or s.tenant == request.tenant)
    ]
    if not found:
        raise WorkerNotFound(request.worker_id, request.tenant)
    if len(found) > 1:
        tenants = ", ".join(sorted(repr(s.tenant) for s in found))
        raise InvalidArgument(
            [
                FieldViolation(
                    "tenant",
                    f"workers of tenants {tenants} have the id {request.worker_id!r}: name one",
                )
            ]
        )
    (session,) = found
    reason = request.reason or "drained by an operator"
    if not session.draining:
        _log.info("draining worker %s of tenant %r (%s)", session.worker_id, session.tenant, reason)
    session.draining = True
    session.push(worker_service_pb2.ConnectResponse(drain=worker_service_pb2.Drain(reason=reason)))
    return session
