"""Circuit breakers per (tenant, type), pure logic: the window, opening at the failure
rate with a minimum count, the cool-down, half-open probes, and a failover that keeps an
open breaker open (the store is replaced by the rows it would hold)."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.coordinator.dispatch.breakers import Breakers, Settings, State
from conveyor.coordinator.store import breakers as store
from conveyor.v1 import task_pb2

OK = task_pb2.ATTEMPT_OUTCOME_SUCCEEDED
FAILED = task_pb2.ATTEMPT_OUTCOME_FAILED
EXPIRED = task_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED
NOT_STARTED = task_pb2.ATTEMPT_OUTCOME_NOT_STARTED
TYPES = ("mail", "sms")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ended(*items: tuple[str, int, int]) -> collections.Counter[tuple[str, str, int | None]]:
    return collections.Counter({("t", type_, outcome): n for type_, outcome, n in items})


def breakers(clock: Clock) -> Breakers:
    return Breakers(Settings(0.5, 10, 10.0, 5.0, 2), clock)


def test_a_breaker_opens_at_the_rate_once_the_window_holds_enough() -> None:
    clock = Clock()
    b = breakers(clock)
    b.count(ended(("mail", FAILED, 6), ("mail", NOT_STARTED, 50)))  # 6 < 10 counted
    assert b.allowed("t", TYPES) is TYPES
    b.count(ended(("mail", OK, 5)))  # 6 of 11 failed
    assert b.allowed("t", TYPES) == ("sms",) and b.blocks("t", "mail")
    assert b.allowed("other", TYPES) is TYPES  # per tenant
    assert [(x.type, x.state) for x in b.of_tenant("t")] == [("mail", State.OPEN)]
    clock.now += 11
    b.count(ended(("sms", OK, 9), ("sms", EXPIRED, 4)))  # 4 of 13: below the rate
    assert b.allowed("t", TYPES) == ("sms",)  # mail is half-open by now
    clock.now += 11  # the 13 leave the window
    b.count(ended(("sms", EXPIRED, 6)))
    assert b.allowed("t", TYPES) == ("sms",)  # 6 of 6, but fewer than 10
    b.count(ended(("sms", OK, 4)))
    assert b.allowed("t", TYPES) == ()


def test_cool_down_probes_and_close() -> None:
    clock = Clock()
    b = breakers(clock)
    woken: list[int] = []
    b.wake = lambda: woken.append(1)
    b.count(ended(("mail", FAILED, 10)))
    assert b.probing("t", TYPES) == []
    clock.now += 5
    assert b.allowed("t", TYPES) == ("sms",)  # half-open: mail only through probes
    assert woken and b.probing("t", TYPES) == [("mail", 2)]
    b.sent_probes("t", "mail", 2)
    assert b.probing("t", TYPES) == []
    b.count(ended(("mail", OK, 1)))
    assert b.states() == [("t", "mail", State.HALF_OPEN)]
    b.count(ended(("mail", OK, 1)))
    assert b.states() == [("t", "mail", State.CLOSED)]
    assert b.allowed("t", TYPES) is TYPES
    # A probe that fails opens it again for a whole cool-down.
    b.count(ended(("mail", FAILED, 10)))
    clock.now += 5
    b.allowed("t", TYPES)
    b.count(ended(("mail", FAILED, 1)))
    clock.now += 4
    assert b.allowed("t", TYPES) == ("sms",) and b.probing("t", TYPES) == []


async def test_a_new_leader_keeps_an_open_breaker_open(monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[Any] = []
    opened = datetime.now(UTC) - timedelta(seconds=2)

    async def load_all(conn: object) -> list[dict[str, Any]]:
        return [{"tenant": "t", "type": "mail", "state": 1, "opened_time": opened}]

    async def save(conn: object, rows: Any) -> None:
        saved.extend(rows)

    monkeypatch.setattr(store, "load_all", load_all)
    monkeypatch.setattr(store, "save", save)
    clock = Clock()
    b = breakers(clock)
    b.reset()
    await b.refresh(None)
    # Half-open when the old leader wrote it: open again, with 3 s of its cool-down left.
    assert b.allowed("t", TYPES) == ("sms",) and b.probing("t", TYPES) == []
    clock.now += 3.1
    assert b.allowed("t", TYPES) == ("sms",) and b.probing("t", TYPES) == [("mail", 2)]
    await b.refresh(None)
    assert saved == [("t", "mail", int(State.HALF_OPEN), opened)]
    # Off: nothing read, nothing counted.
    off = Breakers(Settings(0.0, 10, 10.0, 5.0, 2), clock)
    await off.refresh(None)
    assert off.allowed("t", TYPES) is TYPES
