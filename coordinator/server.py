"""The coordinator process: builds its components and owns their lifecycle.

Everything long-lived starts here, in order, through one
:class:`~conveyor.coordinator.supervisor.Supervisor`, which stops them in the reverse
order: the store's pool, telemetry (metrics endpoint, tracing), the key directory, the
audit log, the group commits (submits, results, lease renewals), the gRPC server, and
leadership (the election, and the leader's services for each term).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import uuid

from conveyor.coordinator.api.admin_service import AdminServicer
from conveyor.coordinator.api.effects_service import LedgerServicer, LockServicer
from conveyor.coordinator.api.interceptors.audit import AuditInterceptor
from conveyor.coordinator.api.interceptors.auth import AuthInterceptor
from conveyor.coordinator.api.interceptors.chain import server_interceptors
from conveyor.coordinator.api.keda_scaler import KedaScaler
from conveyor.coordinator.api.queue_ops import QueueOps
from conveyor.coordinator.api.rate_limits import RateLimitService
from conveyor.coordinator.api.schedule_service import ScheduleService
from conveyor.coordinator.api.security_admin import SecurityAdmin
from conveyor.coordinator.api.server import ApiServer
from conveyor.coordinator.api.task_service import TaskServicer
from conveyor.coordinator.api.task_type_service import TaskTypeServicer
from conveyor.coordinator.api.tls import server_tls
from conveyor.coordinator.api.webhook_service import WebhookServicer
from conveyor.coordinator.api.worker_service import WorkerServicer
from conveyor.coordinator.audit.appender import AuditLog
from conveyor.coordinator.config import DEFAULT_TENANT, CoordinatorConfig
from conveyor.coordinator.deps import Deps, Office
from conveyor.coordinator.dispatch.breakers import Breakers, Settings
from conveyor.coordinator.dispatch.deadlines import DeadlineSweeper
from conveyor.coordinator.dispatch.policy import DispatchPolicy
from conveyor.coordinator.dispatch.rate_limits import RateLimits
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.leader.leadership import Leadership
from conveyor.coordinator.leader.maintenance import (
    DependencySweeper,
    Promoter,
    Reaper,
    Retention,
)
from conveyor.coordinator.lifecycle.leases import Dispatcher, Leases
from conveyor.coordinator.lifecycle.results import ResultRecorder
from conveyor.coordinator.lifecycle.submits import Submitter
from conveyor.coordinator.lifecycle.task_events import TaskEventHub
from conveyor.coordinator.lifecycle.task_types import TaskTypes
from conveyor.coordinator.lifecycle.watch_reader import WatchReader
from conveyor.coordinator.lifecycle.watchers import TaskWatchers
from conveyor.coordinator.lifecycle.work_ready import WorkReadyRelay
from conveyor.coordinator.schedules.firer import ScheduleFirer
from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.store.db import Database, Pool
from conveyor.coordinator.store.migrator import migrate
from conveyor.coordinator.store.sql import UNSAFE_DISABLE_FENCING
from conveyor.coordinator.supervisor import Service, Supervisor
from conveyor.coordinator.telemetry import Telemetry
from conveyor.coordinator.tenancy.auth import Authenticator, FailureLimiter, OpenStreams
from conveyor.coordinator.tenancy.backlog import BacklogCounter
from conveyor.coordinator.tenancy.bootstrap import ensure_bootstrap_key
from conveyor.coordinator.tenancy.directory import Directory
from conveyor.coordinator.tenancy.queue_backlog import QueueBacklogCounter
from conveyor.coordinator.tenancy.quotas import Quotas
from conveyor.coordinator.webhooks.delivery import WebhookDeliverer
from conveyor.observability.tracing import SERVICE_COORDINATOR, Tracing
from conveyor.transport._gc import freeze_startup_heap
from conveyor.transport._tls import ServerTLS

_log = logging.getLogger("conveyor.coordinator")

FULL_COLLECTION_THRESHOLD = 10_000
"""Young collections (of generation 1) between two full ones, at least (Python: 10).

Each worker stream keeps about 150 objects tracked by the garbage collector (its tasks,
coroutines and futures, grpc.aio's call state): 1.5 million with 10,000 streams, which
a full collection walks in 1-2 s on the 2-core VM, with the event loop stopped. Every
message of a stream replaces a few dozen objects that live until the next one
(heartbeats: 10 s), so they outlive the young generations and count towards the next
full collection: with Python's thresholds one ran every 3-10 s, and every pickup that
met one waited for it (pickup p99 1.6-4.6 s at 10,000 streams, issue 19). Cyclic garbage
here is scarce (under 100 objects found per full collection), so collecting it rarely
costs little memory; full collections still run (Python also waits until a quarter of
the old generation is new). With the young collections on a clock
(:data:`YOUNG_COLLECTION_INTERVAL`, four a second), this is at least 40 minutes apart."""

YOUNG_COLLECTION_INTERVAL = 0.25
"""Seconds between two collections of the young generations, besides Python's own.

Python starts a young collection when allocations less deallocations pass 700, and the
deallocations of old objects count too: with 10,000 idle streams, each heartbeat's
objects replacing the last one's, that difference hardly grows, so the young
generations filled with 20,000-60,000 objects before a collection, which then stopped
the event loop for 30-90 ms (issue 19, gc callbacks timing each one; pickups met them).
Collected on a clock, they hold a quarter of a second's survivors: about 2,500 objects,
a millisecond or two. Each object is still walked once before it is old, so the CPU is
the same; only the pauses are shorter."""


def tune_garbage_collector() -> None:
    """Makes full collections rarer (see :data:`FULL_COLLECTION_THRESHOLD`); for the
    coordinator's process only, after its start-up heap is frozen."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)


async def collect_young(interval: float = YOUNG_COLLECTION_INTERVAL) -> None:
    """Collects the young generations every ``interval`` seconds until cancelled (see
    :data:`YOUNG_COLLECTION_INTERVAL`)."""
    while True:
        await asyncio.sleep(interval)
        gc.collect(1)


def new_node_id() -> str:
    """A coordinator's id: ``hostname-random``, unique per process."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Coordinator:
    """One coordinator: gRPC API, dispatcher, result recorder and maintenance sweeps.

    With etcd endpoints it joins its cluster's election and leads only while it holds the
    etcd lease; without etcd it leads by itself (``leader/leadership.py``). Either way,
    every dispatch-side write is fenced by the epoch.
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
        """Metrics (``telemetry.metrics``: ``enabled`` only with ``metrics_listen``) and
        tracing (``tracing`` given, or from the ``OTEL_*`` environment)."""
        self.office = Office(config.cluster)
        self.office.on_refused = self.telemetry.metrics.fenced
        self.sessions = SessionRegistry()
        self.watchers = TaskWatchers(max_per_tenant=config.max_watch_streams)
        self.streams = OpenStreams()
        """Open streams per API key, ended when their key is revoked or expires."""
        self.components = Supervisor("coordinator")
        """Every long-lived component, in start order; stopped in reverse by stop()."""
        self.deps: Deps | None = None
        #: The TLS set-up served (None: plaintext), set by start().
        self.tls: ServerTLS | None = None
        self.submitter: Submitter | None = None
        self.directory: Directory | None = None
        """API keys and tenant limits in memory, kept current (LISTEN/NOTIFY)."""
        self.schedule_firer: ScheduleFirer | None = None
        self.dispatcher: Dispatcher | None = None
        self.task_types: TaskTypes | None = None
        """Task-type definitions, cached (LISTEN/NOTIFY keeps them current)."""
        self.work_ready: WorkReadyRelay | None = None
        """Wakes the leader's dispatcher when a follower commits a submit (NOTIFY)."""
        self.events: TaskEventHub | None = None
        """WatchTasks streams and the relay of task changes between coordinators."""
        self.webhooks: WebhookDeliverer | None = None
        """The leader's webhook deliverer (one of :attr:`services`)."""
        self.services: list[Service] = []
        """The leader's services, started in this order for each term (``leadership``)."""
        self.everywhere: list[Service] = []
        """The services every coordinator runs for the life of its process (backlog
        counters, watch reader): what serves submits and reads, followers' too."""
        self.leadership: Leadership | None = None
        self._api: ApiServer | None = None
        self._closed = asyncio.Event()

    @property
    def epoch(self) -> int:
        return self.office.epoch

    @property
    def leader(self) -> bool:
        return self.office.leader

    async def start(self) -> None:
        """Starts every component in order (a failure stops those already started)."""
        # Before anything starts: a bad certificate is a one-line error, not a late one.
        self.tls = server_tls(self.config)
        if UNSAFE_DISABLE_FENCING:
            _log.error("CONVEYOR_UNSAFE_DISABLE_FENCING is set: fencing is OFF (tests only)")
        try:
            await self._start()
        except BaseException:
            await self.components.stop()
            raise

    async def _start(self) -> None:
        cfg, components = self.config, self.components
        pools = await components.start(Pool(cfg))
        pool = pools.pool
        await components.start(self.telemetry)
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
        # The result connections plan their statements before any result comes.
        await pools.warm()
        db = Database(pool, claims=pools.claims, results=pools.results)
        self.directory = directory = Directory(
            db, cfg.dsn, refresh=cfg.key_refresh, metrics=self.telemetry.metrics
        )
        directory.on_key_change(self.streams.key_changed)
        await components.start(directory)
        audit = await components.start(AuditLog(db))
        # Warmed before the API serves: submits read type definitions from it.
        self.task_types = await components.start(TaskTypes(db, cfg.dsn, self.telemetry.metrics))
        auth: AuthInterceptor | None = None
        authenticator: Authenticator | None = None
        if cfg.authentication:
            limiter = FailureLimiter(cfg.auth_failure_rate, cfg.auth_failure_burst)
            authenticator = Authenticator(directory, audit, limiter)
            auth = AuthInterceptor(authenticator, self.streams)
        self._api = api = ApiServer(
            cfg,
            interceptors=[
                *self.telemetry.interceptors(),
                *server_interceptors(
                    is_leader=self.office.is_leader,
                    leader_address=self.office.leader_address,
                    auth=auth,
                    audit=AuditInterceptor(audit),
                ),
            ],
            tls=self.tls,
        )
        self.address = api.address

        self.deps = deps = Deps(
            config=cfg,
            db=db,
            office=self.office,
            sessions=self.sessions,
            watchers=self.watchers,
            metrics=self.telemetry.metrics,
            tracing=self.telemetry.tracing,
        )
        self.telemetry.watch(db, self.sessions, deps.after_commit)
        rate_limits = RateLimits()
        breakers = Breakers(
            Settings(
                cfg.breaker_failure_rate,
                cfg.breaker_min_requests,
                cfg.breaker_window,
                cfg.breaker_cooldown,
                cfg.breaker_probes,
            )
        )
        if self.telemetry.metrics.enabled:
            loop = asyncio.get_running_loop()
            self.telemetry.metrics.watch_rate_limits(rate_limits.levels, loop=loop)
            self.telemetry.metrics.watch_circuit_breakers(breakers.states, loop=loop)
        policy = DispatchPolicy(
            lease_seconds=cfg.lease_duration,
            max_payload_bytes=cfg.max_payload_bytes,
            limits=rate_limits,
            breakers=breakers,
            aging=(cfg.aging_interval, cfg.aging_max) if cfg.aging_interval else None,
        )
        leases = Leases(deps)
        self.dispatcher = dispatcher = Dispatcher(deps, policy, leases)
        if self.telemetry.metrics.enabled:
            self.telemetry.metrics.watch_queue_pauses(
                lambda: list(policy.pauses), loop=asyncio.get_running_loop()
            )
        backlog = BacklogCounter(deps)
        queue_backlog = QueueBacklogCounter(deps)
        quotas = Quotas(cfg, directory, backlog, queue_backlog)
        # Each tenant's dispatch weight is among its settings (cached by the directory).
        policy.weight = lambda tenant: quotas.limits(tenant).dispatch_weight
        self.schedule_firer = firer = ScheduleFirer(deps, quotas=quotas)
        self.submitter = Submitter(deps, hand_off=dispatcher)
        self.events = TaskEventHub(
            deps.after_commit,
            cfg.dsn,
            self.node_id,
            max_per_tenant=cfg.max_watch_streams,
            buffer_limit=cfg.max_watch_buffer,
        )
        # WatchTask on a follower: the leader's changes of its tenants, relayed.
        self.events.watch_tasks(self.watchers.tenants, self.watchers.changed)
        self.watchers.on_first_watch = self.events.announce
        recorder = ResultRecorder(deps)
        workers = WorkerServicer(deps, dispatcher, recorder, leases)
        schedules = ScheduleService(deps, now=firer.now, changed=firer.wake, quotas=quotas)
        self.webhooks = WebhookDeliverer(deps)
        promoter = Promoter(deps)
        # A follower's submits wake this coordinator's dispatcher and promoter while it
        # leads (a follower's commits never take this process's after-commit path).
        self.work_ready = WorkReadyRelay(
            deps.after_commit,
            cfg.dsn,
            self.node_id,
            self.office,
            ready=dispatcher.wake,
            scheduled=promoter.due,
        )
        self.services = [
            dispatcher,
            promoter,
            Reaper(deps),
            DependencySweeper(deps),
            firer,
            Retention(deps),
            self.webhooks,
            DeadlineSweeper(deps),
        ]
        self.leadership = leadership = Leadership(
            cfg,
            node_id=self.node_id,
            address=self.address,
            pool=pool,
            office=self.office,
            metrics=self.telemetry.metrics,
            services=self.services,
            step_down=workers.step_down,
        )
        api.serve(
            TaskServicer(
                deps,
                self.submitter,
                schedules,
                quotas=quotas,
                queue_ops=QueueOps(deps, dispatcher),
                rate_limits=RateLimitService(db, rate_limits, authentication=cfg.authentication),
                breakers=breakers,
                events=self.events,
                task_types=self.task_types,
            ),
            workers,
            AdminServicer(
                self.sessions,
                db,
                view=leadership.cluster_view,
                replicas=leadership.replicas,
                security=SecurityAdmin(db, directory, quotas),
                paused=lambda: list(policy.pauses),
            ),
            (LedgerServicer(deps), LockServicer(deps)),
            WebhookServicer(deps),
            TaskTypeServicer(db, max_payload_bytes=cfg.max_payload_bytes),
            KedaScaler(deps, authenticator),
        )
        # Every coordinator admits submits, so each counts the backlogs its quotas check
        # (reads), for the life of the process rather than of a term.
        self.everywhere = [backlog, *([queue_backlog] if cfg.max_queue_backlog > 0 else [])]
        for service in self.everywhere:
            await components.start(service)
        await components.start(self.submitter)
        await components.start(recorder)
        await components.start(leases)
        # WatchTask streams are reads: served for the life of the process, not of a term.
        self.everywhere.append(await components.start(WatchReader(deps)))
        # WatchTasks streams: theirs for the life of the process too.
        await components.start(self.events)
        await components.start(self.work_ready)
        await components.start(api)
        if not cfg.authentication:
            _log.error(
                "AUTHENTICATION IS OFF (--insecure): anyone who reaches %s can submit, read, "
                "cancel and administer everything, as tenant %r. Never expose it like this.",
                self.address,
                DEFAULT_TENANT,
            )
        await components.start(leadership)

    async def stop(self, grace: float = 5.0) -> None:
        """Stops every component in reverse order: leaves office (workers are sent to
        the next leader), stops taking calls and lets those in progress finish within
        ``grace``, flushes the group commits, then closes the store."""
        if self._api is None or self._closed.is_set():
            return
        self._api.grace = grace
        await self.components.stop()
        self._closed.set()
        _log.info("coordinator %s stopped", self.node_id)

    async def wait_closed(self) -> None:
        await self._closed.wait()


def raise_open_files_limit() -> int:
    """Raises this process's soft limit of open files to its hard limit; returns the soft
    limit now.

    Every worker stream is a connection, so a socket each: the usual soft limit of 1,024
    would refuse connections past about a thousand workers while the hard limit (often
    tens of thousands) allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            _log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and soft < 4 * 1024:
        _log.warning(
            "at most %d files may be open (ulimit -n): about as many workers can connect; "
            "raise the hard limit for more",
            soft,
        )
    return soft


async def serve(config: CoordinatorConfig, *, ready: asyncio.Event | None = None) -> None:
    """Runs a coordinator until SIGTERM or SIGINT, then shuts it down gracefully.

    Tracing follows the ``OTEL_*`` environment, as the process's global tracer provider.
    """
    raise_open_files_limit()
    node_id = new_node_id()
    tracing = Tracing.from_env(SERVICE_COORDINATOR, instance_id=node_id, set_global=True)
    coordinator = Coordinator(config, node_id=node_id, tracing=tracing)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    young: asyncio.Task[None] | None = None
    # Before starting: the port serves (and health says so) while the rest still starts,
    # and a SIGTERM then must stop the coordinator gracefully, not kill it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await coordinator.start()
        # Everything made so far lives as long as the process: full collections skip it.
        freeze_startup_heap()
        tune_garbage_collector()
        young = loop.create_task(collect_young(), name="collect-young")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if young is not None:
            young.cancel()
        await coordinator.stop()
