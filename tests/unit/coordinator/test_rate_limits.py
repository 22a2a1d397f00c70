"""The leader's token buckets (pure logic; the store is replaced by the rows it would
return): a new term starts empty whatever level was written, caps per pair, queue, type
and tenant, spending, and the wait for the next token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from conveyor.coordinator.dispatch.rate_limits import RateLimits
from conveyor.coordinator.store import rate_limits as store


def row(tenant: str, queue: str, type_: str, rate: float, burst: int, tokens: float) -> Any:
    return {
        "tenant": tenant, "queue": queue, "type": type_, "rate": rate, "burst": burst,
        "tokens": tokens, "tokens_time": None,
    }  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    rows: list[Any] = []
    saved: list[Sequence[tuple[str, str, str, float]]] = []

    async def load_all(conn: object) -> list[Any]:
        return rows

    async def save_levels(conn: object, levels: Sequence[tuple[str, str, str, float]]) -> None:
        saved.append(levels)

    monkeypatch.setattr(store, "load_all", load_all)
    monkeypatch.setattr(store, "save_levels", save_levels)
    return rows


async def test_a_new_term_starts_every_bucket_empty(clock: Clock, table: list[Any]) -> None:
    # The table says the bucket is full (the old leader's last write): not trusted.
    table.append(row("t", "", "send", 10.0, 100, tokens=100.0))
    limits = RateLimits(clock)
    assert limits.covering("t", "q", "other")  # not read yet: no hand-off at all
    await limits.refresh(None)
    assert not limits.covering("t", "q", "other") and limits.covering("t", "q", "send")
    caps = limits.caps("t", ["q"], ["send", "other"], 500)
    assert caps is not None
    assert caps.pairs == [("q", "other", 500)]  # "send" has no whole token yet
    clock.now += 0.35
    caps = limits.caps("t", ["q"], ["send", "other"], 500)
    assert caps is not None and caps.types == [("send", 3)]
    assert caps.pairs == [("q", "send", 3), ("q", "other", 500)]
    limits.spend(caps, [{"queue": "q", "type": "send"}] * 3)
    assert limits.wake_after() == pytest.approx((1 - 0.5) / 10.0)
    assert limits.holds[("t", "", "send")] == 1
    # A failover (reset) after the bucket filled up: empty again.
    clock.now += 60
    limits.reset()
    await limits.refresh(None)
    caps = limits.caps("t", ["q"], ["send"], 500)
    assert caps is not None and caps.pairs == []


async def test_caps_take_the_tightest_bucket(clock: Clock, table: list[Any]) -> None:
    table.extend(
        [
            row("t", "q", "a", 1000.0, 40, 0),
            row("t", "q", "", 1000.0, 30, 0),
            row("*", "", "b", 1000.0, 5, 0),
            row("t", "", "", 1000.0, 50, 0),
            row("other", "q", "a", 1.0, 1, 0),  # another tenant's: not this claim's
        ]
    )
    limits = RateLimits(clock)
    await limits.refresh(None)
    clock.now += 10  # every bucket full
    caps = limits.caps("t", ["q", "r"], ["a", "b"], 500)
    assert caps is not None
    assert sorted(caps.pairs) == [("q", "a", 30), ("q", "b", 5), ("r", "a", 50), ("r", "b", 5)]
    assert caps.queues == [("q", 30)] and caps.types == [("b", 5)] and caps.total == 50
    assert limits.caps("t", ["s"], ["c"], 500) is not None  # the tenant-wide bucket
    assert limits.caps("u", ["q"], ["a"], 500) is None  # nothing covers tenant u
    limits.spend(caps, [{"queue": "q", "type": "b"}] * 5 + [{"queue": "r", "type": "a"}] * 2)
    levels = {(t, q, ty): level for _, t, q, ty, level in limits.levels()}
    assert levels[("*", "", "b")] == 0 and levels[("t", "", "")] == 43
    assert levels[("t", "q", "")] == 25 and levels[("t", "q", "a")] == 40
    # A smaller burst set meanwhile cuts the level down to it, never up.
    table[2] = row("*", "", "b", 1000.0, 2, 0)
    table[3] = row("t", "", "", 1000.0, 10, 0)
    clock.now += 10  # full again at the old bursts
    await limits.refresh(None)
    levels = {(t, q, ty): level for _, t, q, ty, level in limits.levels()}
    assert levels[("*", "", "b")] == 2 and levels[("t", "", "")] == 10
