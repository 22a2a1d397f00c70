"""Coordinator configuration and the defaults a task gets when a submit leaves them out."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_QUEUE = "default"
DEFAULT_TENANT = "default"
DEFAULT_CONTENT_TYPE = "application/json"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRY_INITIAL_S = 1.0
DEFAULT_RETRY_MAX_S = 300.0
DEFAULT_RETRY_MULTIPLIER = 2.0
DEFAULT_RETRY_JITTER = 0.2


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator process."""

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
    max_payload_bytes: int = 1 << 20
    """Largest accepted task payload."""
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
    statement_timeout: float = 30.0
    """Seconds any one database round trip may take."""
