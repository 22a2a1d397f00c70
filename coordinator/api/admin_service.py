"""``AdminService``: what an operator asks the cluster (``conveyor status``).

The methods for API keys, tenant limits and the audit log are
:class:`~conveyor.coordinator.api.security_admin.SecurityAdmin`'s; this class only routes them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api.security_admin import SecurityAdmin
from conveyor.coordinator.api.workers import worker_infos
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.leader.election import Member
from conveyor.coordinator.leader.leadership import ClusterView
from conveyor.coordinator.store.db import Database
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

_log = logging.getLogger("conveyor.coordinator.admin")

_Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        sessions: SessionRegistry,
        db: Database,
        *,
        view: Callable[[], ClusterView],
        replicas: Callable[[], Awaitable[list[Member]]],
        security: SecurityAdmin,
    ) -> None:
        self._sessions = sessions
        self._db = db
        self._view = view
        self._replicas = replicas
        self._security = security

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
        workers = await worker_infos(self._sessions, self._db)
        return admin_service_pb2.GetClusterStatusResponse(
            cluster=view.cluster,
            mode=view.mode,
            leader=info(view.leader) if view.leader else None,
            epoch=view.epoch,
            replicas=[info(m) for m in sorted(replicas, key=lambda m: m.node_id)],
            workers=workers,
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
        )

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
