"""Servers embedded in the package: PostgreSQL (for `conveyor dev` and the tests) and etcd
(real members on loopback, for the tests of replicated coordinators)."""

from conveyor.embedded.etcd import (
    EtcdCluster,
    EtcdError,
    EtcdNotFoundError,
    EtcdServer,
    find_etcd_binary,
)
from conveyor.embedded.postgres import (
    EmbeddedPostgres,
    EmbeddedPostgresBusyError,
    EmbeddedPostgresError,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresBusyError",
    "EmbeddedPostgresError",
    "EtcdCluster",
    "EtcdError",
    "EtcdNotFoundError",
    "EtcdServer",
    "find_etcd_binary",
]
