"""``AdminService``: what an operator asks the cluster (``conveyor status``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.election import Member
from conveyor.coordinator.sessions import SessionRegistry
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc


@dataclass(frozen=True)
class ClusterView:
    """What one coordinator knows about its cluster."""

    cluster: str
    mode: str
    me: Member
    leader: Member | None
    epoch: int


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        sessions: SessionRegistry,
        *,
        view: Callable[[], ClusterView],
        replicas: Callable[[], Awaitable[list[Member]]],
    ) -> None:
        self._sessions = sessions
        self._view = view
        self._replicas = replicas

    async def GetClusterStatus(
        self,
        request: admin_service_pb2.GetClusterStatusRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.GetClusterStatusRequest, admin_service_pb2.GetClusterStatusResponse
        ],
    ) -> admin_service_pb2.GetClusterStatusResponse:
        view = self._view()
        leader_id = view.leader.node_id if view.leader else ""

        def info(member: Member) -> admin_service_pb2.CoordinatorInfo:
            return admin_service_pb2.CoordinatorInfo(
                node_id=member.node_id, address=member.address, leader=member.node_id == leader_id
            )

        replicas = await self._replicas()
        return admin_service_pb2.GetClusterStatusResponse(
            cluster=view.cluster,
            mode=view.mode,
            leader=info(view.leader) if view.leader else None,
            epoch=view.epoch,
            replicas=[info(m) for m in sorted(replicas, key=lambda m: m.node_id)],
            workers=[
                admin_service_pb2.WorkerInfo(
                    worker_id=s.worker_id,
                    hostname=s.hostname,
                    pid=s.pid,
                    queues=s.queues,
                    credit=s.credit,
                    draining=s.draining,
                    connect_time=convert.timestamp_from_seconds(s.connect_time),
                )
                for s in self._sessions
            ],
            answered_by=info(view.me),
        )
