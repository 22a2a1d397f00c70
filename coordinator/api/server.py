"""The gRPC server: the services, KEDA's external scaler, health and reflection, behind the
interceptors.

A component of the coordinator (``server.py``): built and bound first (so a port in use
is a one-line error and the address is known to the election), started once every
service is registered, and stopped last but the store: health says NOT_SERVING, calls in
progress get the grace period, then ended worker streams settle their leases.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conveyor.coordinator.api import keda_scaler
from conveyor.coordinator.api.admin_service import AdminServicer
from conveyor.coordinator.api.effects_service import LedgerServicer, LockServicer
from conveyor.coordinator.api.task_service import TaskServicer
from conveyor.coordinator.api.task_type_service import TaskTypeServicer
from conveyor.coordinator.api.tls import add_port
from conveyor.coordinator.api.webhook_service import WebhookServicer
from conveyor.coordinator.api.worker_service import WorkerServicer
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.keda import externalscaler_pb2_grpc
from conveyor.transport._options import FLOW_CONTROL_OPTIONS
from conveyor.transport._tls import ServerTLS
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    effects_service_pb2,
    effects_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    task_type_service_pb2,
    task_type_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

SERVICE_NAMES = (
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    effects_service_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    effects_service_pb2.DESCRIPTOR.services_by_name["LockService"].full_name,
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    task_type_service_pb2.DESCRIPTOR.services_by_name["TaskTypeService"].full_name,
    keda_scaler.SERVICE_NAME,
)
# Clients may ping this often on idle connections (the SDKs' keepalive) without being
# told to calm down (gRPC's default allows one ping in 5 minutes).
MIN_CLIENT_PING_INTERVAL_MS = 5_000
MAX_METADATA_BYTES = 16 << 10
# Calls gRPC's core holds for grpc.aio before it asks for them (it asks for one call per
# method at a time, one event-loop turn each). gRPC's default starts cancelling new calls
# at random past 1,000 waiting and cancels every one past 3,000 (the client sees
# CANCELLED before its first message), so a fleet of thousands of workers connecting at
# once failed most of its attempts and came back with more (issue 19: 60,000 failed
# attempts for 10,000 streams, half the connect phase's CPU). A call still waits at most
# gRPC's 30 s unrequested time, and this bound stays: it is the memory of a call's
# arena and its stream each (the connection is held either way).
MAX_PENDING_CALLS = 20_000


class ApiServer:
    """The coordinator's gRPC server (see the module docstring)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        interceptors: list[grpc.aio.ServerInterceptor],
        tls: ServerTLS | None,
    ) -> None:
        self.grace = 5.0
        """Seconds calls in progress get when the server stops."""
        self._health = health.aio.HealthServicer()
        self._workers: WorkerServicer | None = None
        self._server = server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Soft and hard limit alike: no random cancels below the bound.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
                # HTTP/2 keepalive: a peer that stops answering pings (dead, frozen, cut
                # off) loses its connection even while the TCP socket looks open.
                ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", 0),
                # One limit for request metadata (gRPC's default refuses between 8 and
                # 16 KiB at random): past it RESOURCE_EXHAUSTED, before any interceptor.
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                # A fixed HTTP/2 window, no BDP pings (see FLOW_CONTROL_OPTIONS).
                *FLOW_CONTROL_OPTIONS,
            ],
        )
        port = add_port(server, config.listen, tls)
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is in use or invalid")
        host = config.listen.rsplit(":", 1)[0]
        self.address = config.advertise or f"{host}:{port}"

    def serve(
        self,
        tasks: TaskServicer,
        workers: WorkerServicer,
        admin: AdminServicer,
        effects: tuple[LedgerServicer, LockServicer],
        webhooks: WebhookServicer,
        task_types: TaskTypeServicer,
        scaler: keda_scaler.KedaScaler,
    ) -> None:
        """Registers the services (before :meth:`start`)."""
        server = self._server
        self._workers = workers
        externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(scaler, server)
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(tasks, server)
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        ledger, locks = effects
        effects_service_pb2_grpc.add_LedgerServiceServicer_to_server(ledger, server)
        effects_service_pb2_grpc.add_LockServiceServicer_to_server(locks, server)
        webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server(webhooks, server)
        task_type_service_pb2_grpc.add_TaskTypeServiceServicer_to_server(task_types, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def start(self) -> None:
        await self._server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, serving)

    async def stop(self) -> None:
        """Stops taking calls, lets calls in progress finish within :attr:`grace`, then
        waits for ended worker streams to settle their leases (before the store closes)."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace)
        if self._workers is not None:
            await self._workers.wait_settled()
