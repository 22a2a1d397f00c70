"""Servers embedded in the package: PostgreSQL (for `conveyor dev` and the tests)."""

from conveyor.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError"]
