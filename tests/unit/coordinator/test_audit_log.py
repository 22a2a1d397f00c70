"""The audit log's appender (coordinator/audit.py), with the store faked: batches, waits for
a store that is down and writes what waited once it is back, aggregates failures into one
row per window, and counts what it had to drop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import asyncpg
import pytest
from testsupport import eventually

from conveyor.coordinator.audit import appender as audit
from conveyor.coordinator.audit.appender import AuditLog
from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.store import audit as audit_store
from conveyor.coordinator.store.db import Database


class FakeStore:
    """Stands for the database: ``down`` makes appends fail as an outage would."""

    def __init__(self) -> None:
        self.down = False
        self.refused = 0
        self.batches: list[list[Event]] = []

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[object]:
        yield self

    async def append(self, conn: object, events: Sequence[Event]) -> list[Any]:
        if self.down:
            self.refused += 1
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        self.batches.append(list(events))
        return []

    @property
    def written(self) -> list[Event]:
        return [e for batch in self.batches for e in batch]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    fake = FakeStore()
    monkeypatch.setattr(audit_store, "append", fake.append)
    monkeypatch.setattr(audit, "AGGREGATE_WINDOW", 0.05)
    return fake


def _event(action: str = "CancelTask", **kw: Any) -> Event:
    return Event.make(tenant="acme", key_id="k1", action=action, **kw)


async def test_actions_wait_for_their_commit_and_go_in_batches(store: FakeStore) -> None:
    log = AuditLog(cast(Database, store))
    log.start()
    try:
        results = [log.record(_event(target=str(i))) for i in range(50)]
        assert all([await r for r in results if r is not None])
        assert [e.target for e in store.written] == [str(i) for i in range(50)]
        assert len(store.batches) < 50
    finally:
        await log.stop()


async def test_an_outage_delays_events_it_does_not_lose_them(store: FakeStore) -> None:
    store.down = True
    log = AuditLog(cast(Database, store))
    log.start()
    try:
        waiting = log.record(_event(target="during the outage"))
        assert waiting is not None
        await eventually(lambda: store.refused >= 2, timeout=5)  # it keeps trying
        assert not waiting.done() and log.written == 0
        store.down = False
        assert await waiting
        assert [e.target for e in store.written] == ["during the outage"]
    finally:
        await log.stop()


async def test_failures_are_counted_into_one_row_per_window(store: FakeStore) -> None:
    log = AuditLog(cast(Database, store))
    log.start()
    try:
        for _ in range(1000):
            log.tally(_event("authentication_failed", peer="10.0.0.9", outcome="UNAUTHENTICATED"))
        log.tally(_event("authentication_failed", peer="10.0.0.8", outcome="UNAUTHENTICATED"))
        await eventually(lambda: len(store.written) == 2)
        counts = {e.peer: e.detail.split(";")[0] for e in store.written}
        assert counts == {"10.0.0.9": "count=1000", "10.0.0.8": "count=1"}
    finally:
        await log.stop()


async def test_a_full_queue_drops_and_says_how_many(store: FakeStore) -> None:
    store.down = True
    log = AuditLog(cast(Database, store), max_queued=3)
    log.start()
    kept = [log.record(_event(target=str(i))) for i in range(3)]
    dropped = log.record(_event(target="one too many"))
    assert dropped is not None and dropped.done() and dropped.result() is False
    store.down = False
    await log.stop()  # writes what is queued, and the count of what was not
    assert all(r is not None and r.done() and r.result() for r in kept)
    assert [e.action for e in store.written][-1] == "audit_events_dropped"
    assert store.written[-1].detail == "count=1"
