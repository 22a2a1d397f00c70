"""Migration 0014: the tasks table is vacuumed after a fixed number of dead rows, however
deep the queue (with the default scale factor, 20 % of the table: 2,000,000 dead rows with
10,000,000 tasks waiting, which the claim's head scan reads through)."""

from __future__ import annotations

import asyncpg

from conveyor.coordinator.store.migrator import migrate


async def test_tasks_autovacuum_does_not_scale_with_the_table(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await migrate(conn)
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'tasks'::regclass"
        )
    finally:
        await conn.close()
    assert set(options) >= {
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=50000",
        "autovacuum_vacuum_cost_limit=2000",
    }, options
