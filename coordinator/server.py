"""The coordinator process: wires the store, the services and the background loops."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import uuid
from datetime import datetime

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conveyor.coordinator.admin_service import AdminServicer, ClusterView
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.dispatcher import Dispatcher
from conveyor.coordinator.election import Election, Member, parse_endpoints
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.maintenance import Maintenance
from conveyor.coordinator.results import ResultRecorder
from conveyor.coordinator.schedule_firer import ScheduleFirer
from conveyor.coordinator.schedule_service import ScheduleHooks
from conveyor.coordinator.sessions import SessionRegistry
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store.leadership import UNSAFE_DISABLE_FENCING, Fence
from conveyor.coordinator.store.migrator import migrate
from conveyor.coordinator.submissions import Submitter
from conveyor.coordinator.task_service import TaskServicer
from conveyor.coordinator.watchers import TaskWatchers
from conveyor.coordinator.worker_service import WorkerServicer
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

_log = logging.getLogger("conveyor.coordinator")

# Room for a full SubmitTasks batch of large payloads; per-payload limits are checked apart.
MAX_MESSAGE_BYTES = 64 << 20
SERVICE_NAMES = (
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
)


class Coordinator:
    """One coordinator: gRPC API, dispatcher, result recorder and maintenance sweeps.

    With etcd endpoints it joins its cluster's election (``coordinator/election.py``) and
    leads only while it holds the etcd lease; otherwise it answers with the leader's
    address. Without etcd it leads by itself: at start it takes a new epoch in Postgres, so
    a second coordinator started on the same database fences this one off instead of
    racing it. Either way, every dispatch-side write is fenced by the epoch.
    """

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.node_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self.leader = False
        self.address = ""
        self._pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._closed = asyncio.Event()
        self.sessions = SessionRegistry()
        self.watchers = TaskWatchers()
        self._dispatcher: Dispatcher | None = None
        self._submitter: Submitter | None = None
        self._recorder: ResultRecorder | None = None
        self._maintenance: Maintenance | None = None
        self.schedule_firer: ScheduleFirer | None = None
        self._worker_servicer: WorkerServicer | None = None
        self._election: Election | None = None
        self.leader_changes: set[asyncio.Task[None]] = set()
        # Serialises taking and leaving office, which the election and fencing both do.
        self._office = asyncio.Lock()

    async def start(self) -> None:
        """Migrates the schema, takes office, binds the port and starts the loops."""
        cfg = self.config
        if UNSAFE_DISABLE_FENCING:
            _log.error("CONVEYOR_UNSAFE_DISABLE_FENCING is set: fencing is OFF (tests only)")
        self._pool = await asyncpg.create_pool(
            cfg.dsn,
            min_size=cfg.pool_min_size,
            max_size=cfg.pool_max_size,
            command_timeout=cfg.statement_timeout,
            server_settings={
                # asyncpg prepares every statement; after a few runs PostgreSQL may switch
                # to a generic plan made when the tables were small (a sequential scan
                # joined to 1000 results: seconds per batch once the table has grown).
                # Planning each batch anew costs far less than that.
                "plan_cache_mode": "force_custom_plan",
                # Batch statements look expensive to the planner; compiling them is not
                # worth it for millisecond queries.
                "jit": "off",
                # A transaction of ours holds the leadership row FOR SHARE (the fence)
                # until it ends. If this process freezes mid-transaction (SIGSTOP, a VM
                # pause), that lock would keep the next leader from taking office for as
                # long as the freeze lasts; PostgreSQL ends such a session instead. Our
                # transactions never sit idle for more than a moment otherwise.
                "idle_in_transaction_session_timeout": "5s",
                "application_name": "conveyor-coordinator",
            },
        )
        pool = self._pool
        async with pool.acquire() as conn:
            await migrate(conn)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        port = self._server.add_insecure_port(cfg.listen)
        if port == 0:
            raise OSError(f"cannot listen on {cfg.listen}: the address is in use or invalid")
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = cfg.advertise or f"{host}:{port}"

        self._dispatcher = Dispatcher(
            pool,
            self.sessions,
            self.watchers,
            fence=self._current_fence,
            lease_seconds=cfg.lease_duration,
            poll_interval=cfg.poll_interval,
            on_fenced=self._fenced,
        )
        self._maintenance = Maintenance(
            pool,
            self.watchers,
            fence=self._current_fence,
            reaper_interval=cfg.reaper_interval,
            on_ready=self._dispatcher.wake,
            on_fenced=self._fenced,
        )
        self._submitter = Submitter(
            pool,
            self._dispatcher,
            fence=self._current_fence,
            lease_seconds=cfg.lease_duration,
            max_batch=cfg.max_batch,
            max_pending=cfg.max_pending_operations,
            on_scheduled=self._scheduled,
        )
        self._recorder = ResultRecorder(
            pool,
            self.watchers,
            fence=self._current_fence,
            lease_seconds=cfg.lease_duration,
            max_batch=cfg.max_batch,
            max_pending=cfg.max_pending_operations,
            on_scheduled=self._scheduled,
        )
        self._worker_servicer = WorkerServicer(
            pool,
            self.sessions,
            self._dispatcher,
            self._recorder,
            self.watchers,
            fence=self._current_fence,
            is_leader=lambda: self.leader,
            leader_address=self._leader_address,
            heartbeat_interval=cfg.heartbeat_interval,
            lease_seconds=cfg.lease_duration,
        )
        task_servicer = TaskServicer(
            pool,
            cfg,
            self._submitter,
            self.sessions,
            self.watchers,
            fence=self._current_fence,
            is_leader=lambda: self.leader,
            leader_address=self._leader_address,
            on_ready=self._dispatcher.wake,
        )
        self.schedule_firer = ScheduleFirer(
            pool, fence=self._current_fence, on_ready=self._dispatcher.wake, on_fenced=self._fenced
        )
        task_servicer.configure_schedules(
            ScheduleHooks(on_change=self.schedule_firer.wake, now=self.schedule_firer.now)
        )
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(task_servicer, self._server)
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(
            self._worker_servicer, self._server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.sessions, view=self.cluster_view, replicas=self._replicas),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

        self._submitter.batcher.start()
        self._recorder.start()
        await self._server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, serving)
        if cfg.etcd:
            self._election = Election(
                parse_endpoints(cfg.etcd),
                cluster=cfg.cluster,
                node_id=self.node_id,
                address=self.address,
                ttl=cfg.election_ttl,
                on_elected=self._elected,
                on_deposed=self._deposed,
            )
            self._election.start()
            _log.info(
                "coordinator %s serving on %s; campaigning in cluster %s",
                self.node_id,
                self.address,
                cfg.cluster,
            )
        else:
            await self._elected(None)
            _log.info(
                "coordinator %s serving on %s (single-node), epoch %d",
                self.node_id,
                self.address,
                self.epoch,
            )

    # -- leadership ------------------------------------------------------------------

    async def _elected(self, term_revision: int | None) -> bool:
        """Takes office: records a new epoch in Postgres, then starts dispatching."""
        assert self._pool is not None
        async with self._office:
            async with self._pool.acquire() as conn:
                epoch = await leadership.take_office(
                    conn, self.config.cluster, self.node_id, self.address, term_revision
                )
            if epoch is None:
                _log.warning(
                    "won etcd at revision %s but a newer term is recorded; not leading",
                    term_revision,
                )
                return False
            # Loops of an earlier term may still run (fenced, and elected again before
            # leaving office finished): end them so each loop runs once.
            await self._stop_loops()
            self.epoch = epoch
            self.leader = True
            assert self._dispatcher and self._maintenance and self.schedule_firer
            self._dispatcher.start()
            self._maintenance.start()
            self.schedule_firer.start()
            _log.info(
                "coordinator %s leads cluster %s, epoch %d",
                self.node_id,
                self.config.cluster,
                epoch,
            )
            return True

    async def _deposed(self, reason: str) -> None:
        """Leaves office: stops dispatching at once, sends workers to the new leader."""
        async with self._office:
            if not self.leader:
                return
            self.leader = False
            _log.warning("coordinator %s no longer leads: %s", self.node_id, reason)
            if self._worker_servicer is not None:
                self._worker_servicer.step_down()
            await self._stop_loops()

    def _current_fence(self) -> Fence:
        return Fence(self.config.cluster, self.epoch)

    def _leader_address(self) -> str:
        if self.leader:
            return self.address
        if self._election is not None and self._election.leader is not None:
            return self._election.leader.address
        return ""

    def cluster_view(self) -> ClusterView:
        """What this coordinator knows about the cluster, for AdminService."""
        me = Member(self.node_id, self.address)
        leader: Member | None = me if self.leader else None
        if leader is None and self._election is not None:
            leader = self._election.leader
        return ClusterView(
            cluster=self.config.cluster,
            mode="etcd" if self._election is not None else "single-node",
            me=me,
            leader=leader,
            epoch=self.epoch,
        )

    async def _replicas(self) -> list[Member]:
        if self._election is None:
            return [Member(self.node_id, self.address)]
        return await self._election.members()

    def _scheduled(self, run_at: datetime) -> None:
        if self._maintenance is not None:
            self._maintenance.scheduled(run_at)

    def _fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: stop writing at once."""
        if not self.leader:
            return
        _log.error("%s; this coordinator steps down and stops dispatching", exc)
        # Stop dispatching before anything else runs; the rest of leaving office follows.
        self.leader = False
        self.leader_changes.add(asyncio.get_running_loop().create_task(self._leave_fenced()))

    async def _leave_fenced(self) -> None:
        async with self._office:
            if self.leader:
                return  # elected again meanwhile
            if self._worker_servicer is not None:
                self._worker_servicer.step_down()
            await self._stop_loops()

    async def _stop_loops(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.stop()
        if self._maintenance is not None:
            await self._maintenance.stop()
        if self.schedule_firer is not None:
            await self.schedule_firer.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking calls, lets calls in progress finish within ``grace``, then closes."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._election is not None:
            await self._election.stop()  # resigns, so another replica takes over at once
        await self._stop_loops()
        await asyncio.gather(*self.leader_changes, return_exceptions=True)
        await self._server.stop(grace)
        if self._submitter is not None:
            await self._submitter.batcher.stop()
        if self._recorder is not None:
            await self._recorder.stop()
        if self._pool is not None:
            await self._pool.close()
        self._server = None
        self._closed.set()
        _log.info("coordinator %s stopped", self.node_id)

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def serve(config: CoordinatorConfig, *, ready: asyncio.Event | None = None) -> None:
    """Runs a coordinator until SIGTERM or SIGINT, then shuts it down gracefully."""
    coordinator = Coordinator(config)
    await coordinator.start()
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await coordinator.stop()
