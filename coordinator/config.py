"""Coordinator configuration, validated when it is made, and the defaults a task gets.

The timing rules (checked by :class:`CoordinatorConfig` itself, so every way of starting a
coordinator gets them):

- a worker heartbeats every ``heartbeat_interval``; each heartbeat is answered, so each
  side of a worker stream hears from the other at least that often;
- each side gives up on the other after ``liveness_timeout`` of silence (the worker is
  told it in Welcome; the coordinator evicts the worker): at least two heartbeat
  intervals, so one late message is no reason to cut a stream;
- ``liveness_timeout + heartbeat_interval <= lease_duration``: a worker that gave up on a
  silent (frozen, partitioned) leader still has a heartbeat interval to reach the next
  leader and renew its leases before they expire, so the new leader does not take back
  the work of healthy workers;
- ``max_payload_bytes`` leaves room in a message of ``max_message_bytes`` for the rest of
  an Assignment, so any payload accepted at submit can be delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.coordinator import bounds
from conveyor.observability.metrics import parse_listen
from conveyor.transport._options import MAX_MESSAGE_BYTES as _SDK_MAX_MESSAGE_BYTES

DEFAULT_QUEUE = "default"
DEFAULT_TENANT = "default"
DEFAULT_CONTENT_TYPE = "application/json"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRY_INITIAL_S = 1.0
DEFAULT_RETRY_MAX_S = 300.0
DEFAULT_RETRY_MULTIPLIER = 2.0
DEFAULT_RETRY_JITTER = 0.2

# The gRPC message limit, both ways (room for a full SubmitTasks batch of large payloads):
# the SDK's, so a coordinator never sends what a worker would refuse to read.
MAX_MESSAGE_BYTES = _SDK_MAX_MESSAGE_BYTES
MAX_RETENTION_DAYS = 36_500
ASSIGNMENT_HEADROOM = 64 << 10
"""Bytes an Assignment may take besides its payload (labels, key, names, ...): the
validation limits add up to about 22 KiB."""


class ConfigError(ValueError):
    """An invalid CoordinatorConfig; the message names the setting and the rule."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator process. Invalid settings raise :class:`ConfigError`."""

    dsn: str
    """PostgreSQL connection string."""
    listen: str = "127.0.0.1:50051"
    """host:port to serve gRPC on; port 0 picks a free one."""
    cluster: str = "default"
    """Name of the cluster; coordinators of one cluster share a leader and an epoch."""
    etcd: tuple[str, ...] = ()
    """etcd endpoints (``http://HOST:PORT``); empty means single-node mode (leads alone)."""
    advertise: str = ""
    """host:port other processes reach this coordinator at; defaults to the bound address."""
    election_ttl: float = 2.0
    """Seconds of the etcd lease behind leadership: how long a dead leader holds office."""
    lease_duration: float = 30.0
    """Seconds a task's lease lasts without a heartbeat before it is taken back."""
    heartbeat_interval: float = 10.0
    """Seconds between worker heartbeats (told to workers in Welcome)."""
    liveness_timeout: float = 0.0
    """Seconds of silence after which each side of a worker stream gives up on the other
    (told to workers in Welcome). 0: ``lease_duration - heartbeat_interval``, the longest
    the rules allow."""
    max_payload_bytes: int = 1 << 20
    """Largest accepted task payload (and task result)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest gRPC message sent or received."""
    reaper_interval: float = 1.0
    """Seconds between sweeps for expired leases."""
    poll_interval: float = 1.0
    """Longest a waiting worker goes without the dispatcher looking for work again."""
    pool_min_size: int = 4
    pool_max_size: int = 16
    """Size bounds of the PostgreSQL connection pool."""
    max_batch: int = 1000
    """Most operations (submits, results, claimed tasks) written in one transaction."""
    max_pending_operations: int = 50_000
    """Submits and results waiting for a transaction beyond this are refused (backpressure)."""
    max_backlog: int = 0
    """Most unfinished tasks (pending, scheduled, running) each tenant may hold, unless its
    own limit says otherwise; submits past it are refused with QUOTA_EXCEEDED and nothing
    is written. 0: no limit."""
    max_queue_backlog: int = 0
    """Most unfinished tasks (pending, scheduled, running) one queue of a tenant may hold;
    submits past it are refused with QUOTA_EXCEEDED (``max_queue_backlog``) and RetryInfo,
    and nothing is written. 0: no limit."""
    backlog_refresh: float = 1.0
    """Seconds between counts of unfinished tasks while some tenant has a backlog limit."""
    submit_rate: float = 0.0
    """Tasks per second each tenant may submit (token bucket), unless its own limit says
    otherwise. 0: no limit."""
    submit_burst: int = 0
    """Tasks each tenant may submit at once above ``submit_rate`` (the bucket size); 0:
    one second's worth."""
    max_schedules: int = 0
    """Schedules each tenant may have, unless its own limit says otherwise. 0: no limit."""
    max_watch_streams: int = 1000
    """WatchTask streams each tenant may have open on one coordinator; past it, WatchTask
    is refused with QUOTA_EXCEEDED. 0: no limit. (All watchers share one read of
    PostgreSQL per change and per refresh, so this bounds streams and memory, not load
    on the database.)"""
    authentication: bool = True
    """Require an API key on every call (``authorization: Bearer <key>``). False
    (``--insecure``): no checks, every call acts as tenant "default" with every scope."""
    bootstrap_key: str = field(default="", repr=False)
    """An API key (``cvk_...``) made an admin key of tenant ``bootstrap_tenant`` with every
    scope at start, unless a key with its id exists already (a revoked one stays revoked)."""
    bootstrap_tenant: str = DEFAULT_TENANT
    key_refresh: float = 30.0
    """Seconds between full reloads of the API keys and tenant limits (a safety net:
    changes arrive through LISTEN/NOTIFY within a second)."""
    auth_failure_rate: float = 2.0
    """Failed authentications per second a peer address may keep up once past
    ``auth_failure_burst``; beyond that its calls are refused unchecked for a while."""
    auth_failure_burst: int = 30
    """Failed authentications a peer address may have in a burst. 0: no limit."""
    statement_timeout: float = 30.0
    """Seconds any one database round trip may take."""
    keepalive_time: float = 20.0
    """Seconds between HTTP/2 keepalive pings the server sends on idle connections."""
    keepalive_timeout: float = 10.0
    """Seconds a keepalive ping may go unanswered before the connection is closed."""
    max_worker_loop_lag: float = 1.0
    """Seconds of event-loop lag (reported with each heartbeat) past which a worker is
    assigned nothing until it reports at most half of it (``dispatch/health.py``). 0: no
    limit."""
    retention_days: float = 0.0
    """Days a finished task (SUCCEEDED, DEAD, CANCELLED) is kept after it finished; the
    leader deletes older ones in small batches (``leader/maintenance.py``). 0: kept
    until deleted (DeleteTasks)."""
    retention_interval: float = 60.0
    """Seconds between the leader's retention sweeps (while one finds nothing more)."""
    metrics_listen: str = ""
    """host:port to serve Prometheus metrics on (``/metrics``); port 0 picks a free one.
    Empty: no metrics endpoint, and nothing is recorded."""
    tls_cert_file: str = ""
    """PEM certificate chain to serve TLS with (with ``tls_key_file``); empty: plaintext.
    Renewed files are picked up on the next handshake (``api/tls.py``)."""
    tls_key_file: str = ""
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: str = ""
    """PEM certificates that issue client certificates: when set, every client and worker
    must present one (mutual TLS). Needs ``tls_cert_file``."""

    max_watch_buffer: int = 10_000
    """Task changes a WatchTasks stream may have waiting to be sent; past it, the stream
    is ended with WATCH_TOO_SLOW instead of buffering more."""
    webhook_allow_private: bool = False
    """Let webhook deliveries go to any address (loopback, private, link-local) and over
    plain HTTP; by default only to public addresses over HTTPS (``webhooks/guard.py``)."""
    webhook_timeout: float = 10.0
    """Seconds one webhook delivery may take (connect, send, answer)."""
    webhook_retry_for: float = 86_400.0
    """Seconds a webhook event is retried (from the event, or its replay) before it is
    FAILED."""
    webhook_retry_initial: float = 1.0
    """Seconds before a failed webhook delivery's first retry (doubling, capped at 5 min)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid coordinator configuration: " + "; ".join(problems))

    @property
    def worker_liveness_timeout(self) -> float:
        """``liveness_timeout``, with its default applied."""
        return self.liveness_timeout or self.lease_duration - self.heartbeat_interval

    def _limit_problems(self) -> list[str]:
        """What is wrong with the tenant limits, the throttle, the worker loop-lag limit and
        the bootstrap key."""
        out: list[str] = []
        limits: tuple[tuple[str, float], ...] = (("max_backlog", self.max_backlog),
                            ("max_queue_backlog", self.max_queue_backlog),
                            ("submit_rate", self.submit_rate),
                            ("submit_burst", self.submit_burst),
                            ("max_schedules", self.max_schedules),
                            ("max_watch_streams", self.max_watch_streams),
                            ("auth_failure_burst", self.auth_failure_burst))  # fmt: skip
        for name, limit in limits:
            problem = bounds.limit_problem(name, limit)
            if problem is not None:
                out.append(f"{name} {problem}, got {limit}")
        problem = bounds.seconds_problem(self.max_worker_loop_lag)
        if self.max_worker_loop_lag != 0 and problem is not None:
            out.append(
                f"max_worker_loop_lag {problem}, or 0 for no limit (got {self.max_worker_loop_lag})"
            )
        if not 0 <= self.retention_days <= MAX_RETENTION_DAYS:
            out.append(
                f"retention_days must be between 0 (keep finished tasks) and "
                f"{MAX_RETENTION_DAYS} (got {self.retention_days})"
            )
        # A rate like submit_rate: 0 turns the throttle off (with the burst).
        problem = bounds.rate_problem(self.auth_failure_rate)
        if problem is not None:
            out.append(f"auth_failure_rate {problem}, got {self.auth_failure_rate}")
        if self.bootstrap_key:
            from conveyor.coordinator.api.validation import name_problem
            from conveyor.coordinator.tenancy.keys import parse

            if parse(self.bootstrap_key) is None:
                out.append(
                    "bootstrap_key is not a Conveyor API key (cvk_<id>_<secret>); make one "
                    "with: conveyor keys generate"
                )
            problem = name_problem(self.bootstrap_tenant)
            if problem is not None:
                out.append(f"bootstrap_tenant {self.bootstrap_tenant!r} {problem}")
        return out

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are valid)."""
        out: list[str] = []
        if not self.dsn:
            out.append("dsn is required (postgresql://...)")
        positive = {
            "lease_duration": self.lease_duration,
            "heartbeat_interval": self.heartbeat_interval,
            "election_ttl": self.election_ttl,
            "reaper_interval": self.reaper_interval,
            "poll_interval": self.poll_interval,
            "statement_timeout": self.statement_timeout,
            "keepalive_time": self.keepalive_time,
            "keepalive_timeout": self.keepalive_timeout,
            "backlog_refresh": self.backlog_refresh,
            "key_refresh": self.key_refresh,
            "retention_interval": self.retention_interval,
            "webhook_timeout": self.webhook_timeout,
            "webhook_retry_for": self.webhook_retry_for,
            "webhook_retry_initial": self.webhook_retry_initial,
        }
        for name, value in positive.items():
            problem = bounds.seconds_problem(value)
            if problem is not None:
                out.append(f"{name} {problem} (got {value})")
        problem = bounds.seconds_problem(self.liveness_timeout)
        if self.liveness_timeout != 0 and problem is not None:
            out.append(
                f"liveness_timeout {problem}, or 0 for the default (got {self.liveness_timeout})"
            )
        if not 1 <= self.pool_min_size <= self.pool_max_size:
            out.append(
                f"pool sizes must satisfy 1 <= pool_min_size <= pool_max_size "
                f"(got {self.pool_min_size} and {self.pool_max_size})"
            )
        for name, value in (("max_batch", self.max_batch),
                            ("max_pending_operations", self.max_pending_operations),
                            ("max_watch_buffer", self.max_watch_buffer)):  # fmt: skip
            if value < 1:
                out.append(f"{name} must be at least 1 (got {value})")
        if self.metrics_listen:
            try:
                parse_listen(self.metrics_listen)
            except ValueError as exc:
                out.append(f"metrics_listen: {exc}")
        out += self._limit_problems()
        if self.etcd and 0 < self.election_ttl < 1:
            out.append(
                f"election_ttl must be at least 1 second: etcd leases are whole seconds "
                f"(got {self.election_ttl})"
            )
        out += _tls_problems(self)
        if out:
            return out  # the relations below assume sane values
        heartbeat, lease = self.heartbeat_interval, self.lease_duration
        liveness = self.worker_liveness_timeout
        if liveness < 2 * heartbeat:
            out.append(
                f"liveness timeout {liveness:g}s must be at least two heartbeat intervals "
                f"(2 x {heartbeat:g}s): lower heartbeat_interval or raise lease_duration"
            )
        if liveness + heartbeat > lease:
            out.append(
                f"liveness timeout {liveness:g}s plus one heartbeat interval ({heartbeat:g}s) "
                f"must not exceed lease_duration {lease:g}s, so a worker that gave up on a "
                "silent leader can renew its leases with the next one before they expire"
            )
        limit = self.max_message_bytes - ASSIGNMENT_HEADROOM
        if not 1 <= self.max_payload_bytes <= limit:
            out.append(
                f"max_payload_bytes must be between 1 and max_message_bytes - "
                f"{ASSIGNMENT_HEADROOM} = {limit} so that every accepted payload fits in a "
                f"message (got {self.max_payload_bytes})"
            )
        return out


def _tls_problems(config: CoordinatorConfig) -> list[str]:
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        return ["TLS needs both tls_cert_file and tls_key_file (--tls-cert and --tls-key)"]
    if config.tls_client_ca_file and not config.tls_cert_file:
        return [
            "tls_client_ca_file (--tls-client-ca) needs TLS: give tls_cert_file and "
            "tls_key_file (--tls-cert, --tls-key) too"
        ]
    return []
