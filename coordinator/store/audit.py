"""SQL for the ``audit_events`` hash chain (migration 0003; the chain is ``audit/chain.py``'s).

Appends are serialized across every coordinator (and ``conveyor keys --dsn``) by a
transaction-level advisory lock: the appender reads the head under it, chains its batch
in Python and inserts it with one statement, all in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from conveyor.coordinator.audit.chain import GENESIS, Event, Row, chain
from conveyor.coordinator.store.sql import Query, columns, transpose, unnest

# Any constant: it only has to be the same for every appender ("audt").
_APPEND_LOCK = 0x61756474

_ARRAYS: tuple[tuple[str, str], ...] = (
    ("seq", "bigint"), ("time", "timestamptz"), ("tenant", "text"), ("key_id", "text"),
    ("action", "text"), ("target", "text"), ("outcome", "text"), ("peer", "text"),
    ("request_id", "text"), ("detail", "text"), ("prev_hash", "bytea"), ("hash", "bytea"),
)  # fmt: skip
AUDIT_COLUMNS = tuple(name for name, _ in _ARRAYS)

_LOCK = Query("lock_audit_chain", f"SELECT pg_advisory_xact_lock({_APPEND_LOCK})")
_HEAD = Query("audit_head", "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
_INSERT = Query(
    "append_audit_events",
    f"""
    INSERT INTO audit_events ({columns(AUDIT_COLUMNS)})
    SELECT {columns(AUDIT_COLUMNS, "r")} FROM {unnest(_ARRAYS, "r")}
    """,
)


async def append(conn: asyncpg.Connection, events: Sequence[Event]) -> list[Row]:
    """Appends ``events`` to the chain; ``conn`` must be in a transaction (the lock and the
    head it read are held until it ends)."""
    if not events:
        return []
    await _LOCK.execute(conn)
    head = await _HEAD.fetchrow(conn)
    seq, prev = (int(head["seq"]), bytes(head["hash"])) if head else (0, GENESIS)
    rows = chain(seq, prev, events)
    records = [
        (
            r.seq, r.event.time, r.event.tenant, r.event.key_id, r.event.action, r.event.target,
            r.event.outcome, r.event.peer, r.event.request_id, r.event.detail, r.prev_hash,
            r.hash,
        )
        for r in rows
    ]  # fmt: skip
    await _INSERT.execute(conn, **transpose(records, AUDIT_COLUMNS))
    return rows


def row_from_record(record: asyncpg.Record) -> Row:
    """A stored row as the chain sees it."""
    event = Event(
        time=record["time"],
        tenant=record["tenant"],
        key_id=record["key_id"],
        action=record["action"],
        target=record["target"],
        outcome=record["outcome"],
        peer=record["peer"],
        request_id=record["request_id"],
        detail=record["detail"],
    )
    return Row(record["seq"], event, bytes(record["prev_hash"]), bytes(record["hash"]))


_PAGE_UP = Query(
    "audit_page_oldest_first",
    f"""
    SELECT {columns(AUDIT_COLUMNS)} FROM audit_events
    WHERE (:tenant::text IS NULL OR tenant = :tenant) AND seq > :after
    ORDER BY seq LIMIT :limit
    """,
)
_PAGE_DOWN = Query(
    "audit_page_newest_first",
    f"""
    SELECT {columns(AUDIT_COLUMNS)} FROM audit_events
    WHERE (:tenant::text IS NULL OR tenant = :tenant) AND seq < :before
    ORDER BY seq DESC LIMIT :limit
    """,
)


async def page(
    conn: asyncpg.Connection,
    *,
    tenant: str | None,
    newest_first: bool,
    after: int | None,
    limit: int,
) -> list[Row]:
    """Rows in seq order (or reversed), after the seq ``after`` of the previous page."""
    if newest_first:
        before = after if after is not None else 2**63 - 1
        records = await _PAGE_DOWN.fetch(conn, tenant=tenant, before=before, limit=limit)
    else:
        records = await _PAGE_UP.fetch(conn, tenant=tenant, after=after or 0, limit=limit)
    return [row_from_record(r) for r in records]
