"""SQL of the WatchTasks relay: NOTIFYs between coordinators, and the labels of tasks whose
changes a label-filtered stream waits for (``lifecycle/task_events.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import asyncpg

from conveyor.coordinator.store.sql import Query

_NOTIFY = Query(
    "notify_task_events",
    "SELECT count(pg_notify(c, p)) FROM unnest(:channels::text[], :payloads::text[]) AS n(c, p)",
)


async def notify(
    conn: asyncpg.Connection, channels: Sequence[str], payloads: Sequence[str]
) -> None:
    """Sends the notifications in one round trip (each payload under 8000 bytes)."""
    await _NOTIFY.fetchval(conn, channels=list(channels), payloads=list(payloads))


_LABELS = Query(
    "task_labels",
    """
    SELECT t.tenant, t.id::text AS id, t.labels FROM tasks t
    JOIN unnest(:tenants::text[], :ids::uuid[]) AS k(tenant, id)
        ON t.tenant = k.tenant AND t.id = k.id
    """,
)


async def labels(
    conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Mapping[str, str]]:
    """The labels of tasks by (tenant, id text); a task that is gone is left out."""
    rows = await _LABELS.fetch(conn, tenants=[k[0] for k in keys], ids=[k[1] for k in keys])
    out: dict[tuple[str, str], Mapping[str, str]] = {}
    for row in rows:
        value = row["labels"]
        parsed = json.loads(value) if isinstance(value, str) else (value or {})
        out[(row["tenant"], row["id"])] = {str(k): str(v) for k, v in parsed.items()}
    return out
