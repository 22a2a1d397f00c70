"""Migration 0005 (tasks.encryption_key): tasks stored before it that may still run get
the key id their envelope names, read by PostgreSQL alone, so the claim can keep them from
workers without the key from the first round after the upgrade."""

from __future__ import annotations

import asyncpg

from conveyor.coordinator.store.migrator import load_migrations, migrate
from conveyor.transport._encryption import Binding, KeyRing

ENCRYPTED = "application/vnd.conveyor.encrypted"


async def test_stored_encrypted_tasks_get_their_key_id(database_dsn: str) -> None:
    sealed = KeyRing.generate("k-old.1").seal(b"{}", "application/json", Binding.result("t", "x"))
    rows = [
        # (state, content type, payload, the key id expected)
        (1, ENCRYPTED, sealed, "k-old.1"),  # ready
        (5, ENCRYPTED, sealed, "k-old.1"),  # dead: may be redriven
        (4, ENCRYPTED, sealed, None),  # succeeded: never runs again
        (1, "application/json", sealed, None),  # not marked encrypted
        (1, ENCRYPTED, b"\x00CV", None),  # cut short
        (1, ENCRYPTED, b"\x00CVE\x02\x09k", None),  # a key id longer than what is there
        (1, ENCRYPTED, b"\x00CVE\x02\x03a b" + bytes(40), None),  # not a key id
    ]
    conn = await asyncpg.connect(database_dsn)
    try:
        before = [m for m in load_migrations() if m.version < 5]
        for migration in before:
            await conn.execute(migration.sql)
        ids = []
        for state, content_type, payload, _ in rows:
            ids.append(
                await conn.fetchval(
                    """
                    INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state,
                        priority, max_attempts, run_at, timeout_ms, retry_initial_ms,
                        retry_max_ms, retry_multiplier, retry_jitter, create_time, update_time)
                    VALUES (gen_random_uuid(), 't', 'q', 't', $1, $2, $3, 0, 3, now(), 1, 1,
                        1, 2, 0, now(), now())
                    RETURNING id
                    """,
                    payload,
                    content_type,
                    state,
                )
            )
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " apply_time timestamptz NOT NULL DEFAULT now())"
        )
        for migration in before:
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        assert 5 in await migrate(conn)
        found = {
            r["id"]: r["encryption_key"]
            for r in await conn.fetch("SELECT id, encryption_key FROM tasks")
        }
    finally:
        await conn.close()
    assert [found[i] for i in ids] == [expected for *_, expected in rows]
