"""The autoscaling supervisor's decision (``conveyor worker --autoscale``): up at once, down
one process at a time after a cooldown, within MIN..MAX."""

from __future__ import annotations

import pytest

from conveyor.worker._autoscale import Load, ScalePolicy, parse_range


def policy() -> ScalePolicy:
    return ScalePolicy(1, 4, per_process=10, latency=5.0, cooldown=30.0)


def test_scales_up_at_once_to_the_need_within_the_bounds() -> None:
    p = policy()
    assert p.decide(1, Load(25, 0), now=0) == 3
    assert p.decide(1, Load(1000, 0), now=0) == 4
    assert p.decide(0, Load(0, 0), now=0) == 1  # MIN


def test_a_waiting_task_asks_for_one_more_process() -> None:
    p = policy()
    assert p.decide(2, Load(5, oldest_pending_age=6), now=0) == 3
    assert p.decide(4, Load(5, oldest_pending_age=6), now=0) == 4  # MAX
    assert p.decide(2, Load(15, oldest_pending_age=4), now=0) == 2


def test_scales_down_one_at_a_time_after_the_cooldown() -> None:
    p = policy()
    assert p.decide(4, Load(0, 0), now=0) == 4
    assert p.decide(4, Load(0, 0), now=29) == 4
    assert p.decide(4, Load(0, 0), now=30) == 3
    assert p.decide(3, Load(0, 0), now=31) == 3  # the next step waits a cooldown again
    assert p.decide(3, Load(0, 0), now=60) == 2


def test_a_burst_during_the_cooldown_starts_it_again() -> None:
    p = policy()
    assert p.decide(3, Load(0, 0), now=0) == 3
    assert p.decide(3, Load(30, 0), now=20) == 3  # the need is back: no step down pending
    assert p.decide(3, Load(0, 0), now=40) == 3  # a new lull: its own cooldown
    assert p.decide(3, Load(0, 0), now=70) == 2


@pytest.mark.parametrize("text", ["", "3", "0:0", "4:2", "-1:3", "a:b", "1:2:3"])
def test_bad_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_range(text)


def test_ranges() -> None:
    assert parse_range("0:3") == (0, 3)
    assert parse_range("2:2") == (2, 2)
