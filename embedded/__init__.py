"""Servers embedded in the package: PostgreSQL (for `conveyor dev` and the tests).

(The tests' etcd harness lives in tests/support/etcd_servers.py: it does not ship.)"""

from conveyor.embedded.postgres import (
    EmbeddedPostgres,
    EmbeddedPostgresBusyError,
    EmbeddedPostgresError,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresBusyError",
    "EmbeddedPostgresError",
]
