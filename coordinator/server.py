"""The coordinator process: wires the store, the services and the background loops."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import uuid

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conveyor.coordinator.admin_service import AdminServicer, ClusterView
from conveyor.coordinator.audit import AuditLog
from conveyor.coordinator.auth import Authenticator, FailureLimiter, OpenStreams
from conveyor.coordinator.backlog import BacklogCounter
from conveyor.coordinator.bootstrap import ensure_bootstrap_key
from conveyor.coordinator.config import DEFAULT_TENANT, CoordinatorConfig
from conveyor.coordinator.deps import Deps, Events, Office
from conveyor.coordinator.directory import Directory
from conveyor.coordinator.dispatch_policy import DispatchPolicy
from conveyor.coordinator.dispatcher import Dispatcher
from conveyor.coordinator.election import Election, Member, parse_endpoints
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.intercept_audit import AuditInterceptor
from conveyor.coordinator.intercept_auth import AuthInterceptor
from conveyor.coordinator.interceptors import server_interceptors
from conveyor.coordinator.maintenance import Promoter, Reaper
from conveyor.coordinator.quotas import Quotas
from conveyor.coordinator.results import ResultRecorder
from conveyor.coordinator.schedule_firer import ScheduleFirer
from conveyor.coordinator.schedule_service import ScheduleService
from conveyor.coordinator.security_admin import SecurityAdmin
from conveyor.coordinator.sessions import SessionRegistry
from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.store.migrator import migrate
from conveyor.coordinator.store.sql import UNSAFE_DISABLE_FENCING
from conveyor.coordinator.submissions import Submitter
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.task_service import TaskServicer
from conveyor.coordinator.telemetry import Telemetry
from conveyor.coordinator.tls import add_port, server_tls
from conveyor.coordinator.watch_reader import WatchReader
from conveyor.coordinator.watchers import TaskWatchers
from conveyor.coordinator.worker_service import WorkerServicer
from conveyor.observability.logs import log_context
from conveyor.observability.tracing import SERVICE_COORDINATOR, Tracing
from conveyor.transport._tls import ServerTLS
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

_log = logging.getLogger("conveyor.coordinator")

SERVICE_NAMES = (
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
)
# Clients may ping this often on idle connections (the SDKs' keepalive) without being
# told to calm down (gRPC's default allows one ping in 5 minutes).
MIN_CLIENT_PING_INTERVAL_MS = 5_000
MAX_METADATA_BYTES = 16 << 10


def new_node_id() -> str:
    """A coordinator's id: ``hostname-random``, unique per process."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing beyond what asyncpg always does
    (roll back an open transaction, drop listeners).

    asyncpg's default also sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip on every submit's way to its answer, and
    one more statement for PostgreSQL per batch, to undo session state that pooled
    connections never hold here. Locks and settings are transaction-level
    (``pg_advisory_xact_lock``), no cursor outlives its transaction, and the key
    directory LISTENs on a connection of its own (``directory.py``). Code that adds
    session state to a pooled connection must undo it itself.
    """


class Coordinator:
    """One coordinator: gRPC API, dispatcher, result recorder and maintenance sweeps.

    With etcd endpoints it joins its cluster's election (``coordinator/election.py``) and
    leads only while it holds the etcd lease; otherwise it answers with the leader's
    address. Without etcd it leads by itself: at start it takes a new epoch in Postgres, so
    a second coordinator started on the same database fences this one off instead of
    racing it. Either way, every dispatch-side write is fenced by the epoch.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        node_id: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.node_id = node_id or new_node_id()
        self.address = ""
        self.telemetry = Telemetry(config, node_id=self.node_id, tracing=tracing)
        """Metrics (``telemetry.metrics``, None without ``metrics_listen``) and tracing
        (``tracing`` given, or from the ``OTEL_*`` environment)."""
        self.office = Office(config.cluster)
        self.office.on_fenced = self._fenced
        self.office.leader_address = self._leader_address
        if self.telemetry.metrics is not None:
            self.office.on_refused = self.telemetry.metrics.fenced
        self.sessions = SessionRegistry()
        self.watchers = TaskWatchers(max_per_tenant=config.max_watch_streams)
        self.watch_reader: WatchReader | None = None
        self.deps: Deps | None = None
        self._pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        #: The TLS set-up served (None: plaintext), set by start().
        self.tls: ServerTLS | None = None
        self._health = health.aio.HealthServicer()
        self._closed = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.submitter: Submitter | None = None
        self.recorder: ResultRecorder | None = None
        self.backlog: BacklogCounter | None = None
        self.quotas: Quotas | None = None
        self.directory: Directory | None = None
        """API keys and tenant limits in memory, kept current (LISTEN/NOTIFY)."""
        self.audit: AuditLog | None = None
        self.streams = OpenStreams()
        """Open streams per API key, ended when their key is revoked or expires."""
        self.schedule_firer: ScheduleFirer | None = None
        self.services: list[Service] = []
        """The leader's background services, started on taking office."""
        self._worker_servicer: WorkerServicer | None = None
        self._election: Election | None = None
        self.leader_changes: set[asyncio.Task[None]] = set()
        # Serialises taking and leaving office, which the election and fencing both do.
        self._office_lock = asyncio.Lock()

    @property
    def epoch(self) -> int:
        return self.office.epoch

    @property
    def leader(self) -> bool:
        return self.office.leader

    async def start(self) -> None:
        """Migrates the schema, takes office, binds the port and starts the loops."""
        # Before anything starts: a bad certificate is a one-line error, not a late one.
        self.tls = server_tls(self.config)
        if UNSAFE_DISABLE_FENCING:
            _log.error("CONVEYOR_UNSAFE_DISABLE_FENCING is set: fencing is OFF (tests only)")
        # First: a port in use fails at once, before anything else is started.
        self.telemetry.start_endpoint()
        try:
            await self._start()
        except BaseException:
            await self.telemetry.stop_endpoint()
            raise

    async def _start(self) -> None:
        cfg = self.config
        self._pool = pool = await asyncpg.create_pool(
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
            reset=_keep_session,
        )
        async with pool.acquire() as conn:
            await migrate(conn)
            if cfg.bootstrap_key:
                await ensure_bootstrap_key(conn, cfg.bootstrap_key, cfg.bootstrap_tenant)
            if cfg.authentication and not await key_store.has_active_admin(conn):
                _log.warning(
                    "no API key with the admin scope exists: create one with "
                    "`conveyor keys create --dsn DSN --tenant TENANT --scope admin` (or start "
                    "with CONVEYOR_BOOTSTRAP_KEY; see the README's secure set-up)"
                )
        db = Database(pool)
        self.audit = AuditLog(db)
        self.directory = Directory(
            db, cfg.dsn, refresh=cfg.key_refresh, metrics=self.telemetry.metrics
        )
        self.directory.on_key_change(self.streams.key_changed)
        await self.directory.start()
        self.audit.start()
        auth: AuthInterceptor | None = None
        if cfg.authentication:
            limiter = FailureLimiter(cfg.auth_failure_rate, cfg.auth_failure_burst)
            auth = AuthInterceptor(Authenticator(self.directory, self.audit, limiter), self.streams)
        self._server = server = grpc.aio.server(
            interceptors=[
                *self.telemetry.interceptors(),
                *server_interceptors(
                    is_leader=self.office.is_leader,
                    leader_address=self._leader_address,
                    auth=auth,
                    audit=AuditInterceptor(self.audit),
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # HTTP/2 keepalive: a peer that stops answering pings (dead, frozen, cut
                # off) loses its connection even while the TCP socket looks open.
                ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", 0),
                # One limit for request metadata (gRPC's default refuses between 8 and
                # 16 KiB at random): past it RESOURCE_EXHAUSTED, before any interceptor.
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            ],
        )
        port = add_port(server, cfg.listen, self.tls)
        if port == 0:
            raise OSError(f"cannot listen on {cfg.listen}: the address is in use or invalid")
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = cfg.advertise or f"{host}:{port}"

        self.deps = deps = Deps(
            config=cfg,
            db=db,
            office=self.office,
            sessions=self.sessions,
            watchers=self.watchers,
            events=Events(),
            metrics=self.telemetry.metrics,
            tracing=self.telemetry.tracing,
        )
        self.telemetry.watch(deps.db, self.sessions)
        policy = DispatchPolicy(
            lease_seconds=cfg.lease_duration, max_payload_bytes=cfg.max_payload_bytes
        )
        self.dispatcher = Dispatcher(deps, policy)
        self.backlog = BacklogCounter(deps)
        self.quotas = quotas = Quotas(cfg, self.directory, self.backlog)
        self.schedule_firer = ScheduleFirer(deps, quotas=quotas)
        self.services = [
            self.dispatcher,
            Promoter(deps),
            Reaper(deps),
            self.schedule_firer,
            self.backlog,
        ]
        self.submitter = Submitter(deps, policy=policy, dispatcher=self.dispatcher)
        self.recorder = ResultRecorder(deps)
        self._worker_servicer = WorkerServicer(deps, self.dispatcher, self.recorder)
        schedules = ScheduleService(deps, now=self.schedule_firer.now, quotas=quotas)
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(
            TaskServicer(deps, self.submitter, schedules, quotas=quotas), server
        )
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(self._worker_servicer, server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                self.sessions,
                deps.db,
                view=self.cluster_view,
                replicas=self._replicas,
                security=SecurityAdmin(deps.db, self.directory, quotas),
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        self.submitter.start()
        self.recorder.start()
        # WatchTask streams are reads: served for the life of the process, not of a term.
        self.watch_reader = WatchReader(deps)
        self.watch_reader.start()
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, serving)
        if not cfg.authentication:
            _log.error(
                "AUTHENTICATION IS OFF (--insecure): anyone who reaches %s can submit, read, "
                "cancel and administer everything, as tenant %r. Never expose it like this.",
                self.address,
                DEFAULT_TENANT,
            )
        if cfg.etcd:
            self._election = Election(
                parse_endpoints(cfg.etcd),
                cluster=cfg.cluster,
                node_id=self.node_id,
                address=self.address,
                ttl=cfg.election_ttl,
                on_elected=self._elected,
                on_deposed=self._deposed,
                on_session=self.telemetry.etcd_session,
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
        async with self._office_lock:
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
            await self._stop_services()
            self.office.epoch = epoch
            self.office.leader = True
            self.telemetry.took_office(epoch)
            # The services' tasks copy this context: their log lines carry the epoch.
            with log_context(epoch=epoch):
                for service in self.services:
                    service.start()
                _log.info(
                    "coordinator %s leads cluster %s, epoch %d",
                    self.node_id,
                    self.config.cluster,
                    epoch,
                )
            return True

    async def _deposed(self, reason: str) -> None:
        """Leaves office: stops dispatching at once, sends workers to the new leader."""
        async with self._office_lock:
            if not self.leader:
                return
            self.office.leader = False
            self.telemetry.left_office()
            _log.warning("coordinator %s no longer leads: %s", self.node_id, reason)
            self._redirect_workers()
            await self._stop_services()

    def _redirect_workers(self) -> None:
        if self._worker_servicer is not None:
            self._worker_servicer.step_down()

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

    def _fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: stop writing at once."""
        if not self.leader:
            return
        _log.error("%s; this coordinator steps down and stops dispatching", exc)
        # Stop dispatching before anything else runs; the rest of leaving office follows.
        self.office.leader = False
        self.telemetry.left_office()
        task = asyncio.get_running_loop().create_task(self._leave_fenced())
        self.leader_changes.add(task)
        task.add_done_callback(self.leader_changes.discard)

    async def _leave_fenced(self) -> None:
        async with self._office_lock:
            if self.leader:
                return  # elected again meanwhile
            self._redirect_workers()
            await self._stop_services()

    async def _stop_services(self) -> None:
        for service in self.services:
            await service.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking calls, lets calls in progress finish within ``grace``, then closes."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self.telemetry.stop_endpoint()
        if self._election is not None:
            await self._election.stop()  # resigns, so another replica takes over at once
        await self._stop_services()
        if self.leader:
            # Workers leave on their own (after their pending acknowledgements), instead
            # of holding the server's grace period and being cut.
            self.office.leader = False
            self.telemetry.left_office()
            self._redirect_workers()
        await asyncio.gather(*self.leader_changes, return_exceptions=True)
        await self._server.stop(grace)
        if self._worker_servicer is not None:
            await self._worker_servicer.wait_settled()
        if self.submitter is not None:
            await self.submitter.stop()
        if self.recorder is not None:
            await self.recorder.stop()
        if self.watch_reader is not None:
            await self.watch_reader.stop()
        if self.audit is not None:
            await self.audit.stop()
        if self.directory is not None:
            await self.directory.stop()
        if self._pool is not None:
            await self._pool.close()
        await self.telemetry.shutdown()
        self._server = None
        self._closed.set()
        _log.info("coordinator %s stopped", self.node_id)

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def serve(config: CoordinatorConfig, *, ready: asyncio.Event | None = None) -> None:
    """Runs a coordinator until SIGTERM or SIGINT, then shuts it down gracefully.

    Tracing follows the ``OTEL_*`` environment, as the process's global tracer provider.
    """
    node_id = new_node_id()
    tracing = Tracing.from_env(SERVICE_COORDINATOR, instance_id=node_id, set_global=True)
    coordinator = Coordinator(config, node_id=node_id, tracing=tracing)
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
