"""The one range of each kind of value (coordinator/bounds.py), at its edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.coordinator import bounds
from conveyor.coordinator.schedules.cron import compile_cron, first_tick, next_fire_times

EDGES = [bounds.TIME_MIN, bounds.TIME_MAX]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (bounds.TIME_MIN, True),
        (bounds.TIME_MAX, True),
        (bounds.TIME_MIN - timedelta(microseconds=1), False),
        (bounds.TIME_MAX + timedelta(microseconds=1), False),
        (datetime.min.replace(tzinfo=UTC), False),
        (datetime.max.replace(tzinfo=UTC), False),
    ],
)
def test_times(value: datetime, ok: bool) -> None:
    assert (bounds.time_problem(value) is None) is ok


@pytest.mark.parametrize(
    "zone", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Europe/Berlin"]
)
@pytest.mark.parametrize("cron", ["* * * * * *", "0 0 29 2 *", "59 23 31 12 *"])
@pytest.mark.parametrize("edge", EDGES)
def test_cron_arithmetic_holds_at_both_ends_of_the_range(
    edge: datetime, zone: str, cron: str
) -> None:
    """Ticks from either end of the time range, in the zones furthest from UTC, with
    expressions that match rarely: no overflow anywhere (croniter, datetime, zones)."""
    spec = compile_cron(cron, zone)
    first = first_tick(spec, edge, edge)
    assert first is not None
    assert next_fire_times(spec, first, 3, None)
    assert spec.prev_before(edge) is not None


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0.0, True), (0.001, True), (1e9, True), (1e-300, False), (5e-324, False),
     (float("nan"), False), (float("inf"), False), (-1.0, False), (1e10, False)],
)  # fmt: skip
def test_rates(value: float, ok: bool) -> None:
    assert (bounds.rate_problem(value) is None) is ok
    assert (bounds.limit_problem("submit_rate", value) is None) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (2**62, True), (2**62 + 1, False), (-1, False), (2**63 - 1, False)],
)
def test_counts(value: int, ok: bool) -> None:
    assert (bounds.limit_problem("max_backlog", value) is None) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0.001, True), (86_400, True), (0.0, False), (86_400.5, False), (float("nan"), False),
     (float("inf"), False), (-1.0, False)],
)  # fmt: skip
def test_seconds(value: float, ok: bool) -> None:
    assert (bounds.seconds_problem(value) is None) is ok


def test_retry_delay_is_always_a_duration_protobuf_holds() -> None:
    for value in (float("inf"), float("nan"), 1e300, -5.0):
        assert 0 <= bounds.retry_delay(value) <= bounds.RETRY_AFTER_MAX
    assert bounds.retry_delay(1.5) == 1.5
