"""Versioned schema migrations, applied at coordinator start-up.

Migrations are the numbered ``migrations/NNNN_name.sql`` files next to this module. They are
applied in order, in one transaction, under a transaction-level advisory lock so two
coordinators starting at once apply each migration exactly once; running again is a no-op.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_log = logging.getLogger("conveyor.coordinator.migrations")

# Any constant works; it only has to be the same for every coordinator.
_ADVISORY_LOCK_KEY = 0x636F6E76  # "conv"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Returns the packaged migrations ordered by version."""
    found: list[Migration] = []
    for entry in resources.files("conveyor.coordinator.store").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # A gap or a repeat means a file was lost or two branches took one number: refuse to
    # start rather than run a schema nobody tested.
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(
            f"migration versions must be 1, 2, 3, ... without gaps or repeats, found {versions}"
        )
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Applies pending migrations in one transaction; returns the versions applied now."""
    applied_now: list[int] = []
    async with conn.transaction():
        # Serialises concurrent starters (the CREATE TABLE IF NOT EXISTS included, which
        # is not safe against itself); released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " apply_time timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
            _log.info("applied migration %s", migration.name)
    return applied_now
