"""The autoscaling supervisor (``conveyor worker --autoscale``): its decision (up at once,
down one process at a time after a cooldown, within MIN..MAX) and its restart backoff."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from testsupport import eventually

from conveyor.worker._autoscale import Load, ScalePolicy, Supervisor, parse_range


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


async def test_a_process_that_keeps_dying_is_restarted_with_a_doubling_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real processes (a command that exits at once with 3), no coordinator: the load
    reader says nothing waits, so only MIN=1 is kept, and each death is a quick one."""
    policy = ScalePolicy(1, 1, per_process=1, latency=60, cooldown=60)

    async def idle() -> Load:
        return Load(0, 0)

    command = [sys.executable, "-c", "raise SystemExit(3)"]
    supervisor = Supervisor(command, policy, idle, interval=0.05)
    stop, force = asyncio.Event(), asyncio.Event()
    caplog.set_level(logging.INFO, logger="conveyor.worker.autoscale")

    def restarts() -> list[str]:
        return [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]

    async def watch() -> None:
        await eventually(lambda: len(restarts()) >= 3, timeout=20, what="three restarts")
        stop.set()

    async with asyncio.timeout(30):
        await asyncio.gather(supervisor.run(stop, force), watch())
    delays = [m.split("restarting it in ")[1].split("s ")[0] for m in restarts()[:3]]
    assert delays == ["0.1", "0.1", "0.2"]  # 0.05, 0.1, 0.2 as %.1f
    assert all("exited with 3" in m for m in restarts())
    assert ["quick death 1 in a row" in m for m in restarts()[:3]] == [True, False, False]
    assert "quick death 3 in a row" in restarts()[2]
