"""Tick arithmetic and firing decisions (conveyor.coordinator.cron), without a database.

DST cases use America/New_York in 2025: clocks went forward on 9 March at 02:00 EST (to
03:00 EDT; 07:00 UTC) and back on 2 November at 02:00 EDT (to 01:00 EST; 06:00 UTC), and
Europe/Berlin: forward on 30 March at 02:00 CET (01:00 UTC), back on 26 October at 03:00
CEST (01:00 UTC). Time is whatever the test says it is: every function takes ``now``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from conveyor.coordinator.schedules.cron import (
    CATCH_UP_FIRE_ALL,
    CATCH_UP_FIRE_ONCE,
    CATCH_UP_SKIP,
    OVERLAP_ALLOW,
    OVERLAP_BUFFER_ONE,
    OVERLAP_SKIP,
    CronError,
    CronSpec,
    ScheduleState,
    compile_cron,
    first_tick,
    next_fire_times,
    plan,
)
from conveyor.coordinator.schedules.firer import idempotency_key

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(
    zone: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    """A wall-clock time in ``zone``, as UTC."""
    return datetime(year, month, day, hour, minute, second, tzinfo=zone, fold=fold).astimezone(UTC)


def walk(spec: CronSpec, after: datetime, count: int) -> list[datetime]:
    out: list[datetime] = []
    tick = spec.next_after(after)
    while tick is not None and len(out) < count:
        out.append(tick)
        tick = spec.next_after(tick, is_tick=True)
    return out


class Clock:
    """An injectable clock: the time is what the test sets."""

    def __init__(self, start: datetime) -> None:
        self.time = start

    def __call__(self) -> datetime:
        return self.time

    def advance(self, seconds: float) -> datetime:
        self.time += timedelta(seconds=seconds)
        return self.time


# -- expressions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/15 * * * *", utc(2025, 1, 1, 0, 7), [utc(2025, 1, 1, 0, 15), utc(2025, 1, 1, 0, 30)]),
        (
            "*/20 * * * * *",
            utc(2025, 1, 1, 0, 0, 50),
            [utc(2025, 1, 1, 0, 1), utc(2025, 1, 1, 0, 1, 20)],
        ),
        ("0 9 * * 1-5", utc(2025, 1, 3, 10), [utc(2025, 1, 6, 9), utc(2025, 1, 7, 9)]),
        ("@hourly", utc(2025, 1, 1, 0, 0, 1), [utc(2025, 1, 1, 1), utc(2025, 1, 1, 2)]),
        (
            "30 0 12 * * *",
            utc(2025, 1, 1, 12),
            [utc(2025, 1, 1, 12, 0, 30), utc(2025, 1, 2, 12, 0, 30)],
        ),
    ],
)
def test_next_ticks(expression: str, after: datetime, expected: list[datetime]) -> None:
    assert walk(compile_cron(expression), after, 2) == expected


def test_six_fields_put_seconds_first() -> None:
    spec = compile_cron("5 * * * * *")  # second 5 of every minute
    assert walk(spec, utc(2025, 1, 1), 2) == [utc(2025, 1, 1, 0, 0, 5), utc(2025, 1, 1, 0, 1, 5)]


def test_next_after_is_strict_and_handles_fractions() -> None:
    spec = compile_cron("* * * * * *")
    assert spec.next_after(utc(2025, 1, 1, 0, 0, 5)) == utc(2025, 1, 1, 0, 0, 6)
    half = utc(2025, 1, 1, 0, 0, 5) + timedelta(milliseconds=500)
    assert spec.next_after(half) == utc(2025, 1, 1, 0, 0, 6)
    assert spec.prev_before(half) == utc(2025, 1, 1, 0, 0, 5)
    assert spec.prev_before(utc(2025, 1, 1, 0, 0, 5)) == utc(2025, 1, 1, 0, 0, 4)


def test_fast_same_minute_step_agrees_with_croniter() -> None:
    spec = compile_cron("*/7 */2 * * * *", "Europe/Berlin")
    tick = spec.next_after(utc(2025, 3, 29, 23))
    assert tick is not None
    for _ in range(2000):
        fast = spec.next_after(tick, is_tick=True)
        slow = spec.next_after(tick)
        assert fast == slow
        assert fast is not None
        tick = fast


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * *", "must have 5 fields"),
        ("* * * * * * *", "must have 5 fields"),
        ("61 * * * *", "not a valid cron expression"),
        ("a b c d e", "not a valid cron expression"),
        ("*/0 * * * *", "not a valid cron expression"),
        ("0 0 31 2 *", "matches no time"),
        ("@reboot", "not a valid cron expression"),
    ],
)
def test_invalid_expressions(expression: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        CronSpec(expression)


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus", "america/new_york", "", "../etc/passwd", "Europe"]
)
def test_unknown_time_zones(zone: str) -> None:
    with pytest.raises(CronError, match="not an IANA time zone"):
        CronSpec("* * * * *", zone)


# -- daylight saving time -----------------------------------------------------------------


def test_a_skipped_wall_time_does_not_fire() -> None:
    # 02:30 did not exist in New York on 9 March 2025.
    spec = compile_cron("30 2 * * *", "America/New_York")
    ticks = walk(spec, utc(2025, 3, 8, 12), 2)
    assert ticks == [local(NY, 2025, 3, 10, 2, 30), local(NY, 2025, 3, 11, 2, 30)]


def test_a_repeated_wall_time_fires_once_at_its_first_occurrence() -> None:
    # 01:30 happened twice in New York on 2 November 2025 (EDT, then EST).
    spec = compile_cron("30 1 * * *", "America/New_York")
    ticks = walk(spec, utc(2025, 11, 1, 12), 2)
    assert ticks == [local(NY, 2025, 11, 2, 1, 30, fold=0), local(NY, 2025, 11, 3, 1, 30)]
    assert ticks[0] == utc(2025, 11, 2, 5, 30)  # 01:30 EDT


def test_second_level_ticks_across_spring_forward() -> None:
    spec = compile_cron("* * * * * *", "America/New_York")
    ticks = walk(spec, local(NY, 2025, 3, 9, 1, 59, 57), 4)
    # 01:59:58, 01:59:59 EST, then straight to 03:00:00 and 03:00:01 EDT: one second apart.
    assert ticks == [
        utc(2025, 3, 9, 6, 59, 58),
        utc(2025, 3, 9, 6, 59, 59),
        utc(2025, 3, 9, 7, 0, 0),
        utc(2025, 3, 9, 7, 0, 1),
    ]


def test_second_level_ticks_across_fall_back() -> None:
    spec = compile_cron("*/30 * * * * *", "America/New_York")
    ticks = walk(spec, utc(2025, 11, 2, 5, 59), 4)
    # 01:59:00 and 01:59:30 EDT fire; the repeated hour (01:00-01:59 EST) does not fire
    # again, so the next tick is 02:00:00 EST, one hour and 30 seconds later.
    assert ticks == [
        utc(2025, 11, 2, 5, 59, 30),
        utc(2025, 11, 2, 7, 0, 0),
        utc(2025, 11, 2, 7, 0, 30),
        utc(2025, 11, 2, 7, 1, 0),
    ]


def test_from_inside_the_repeated_hour() -> None:
    spec = compile_cron("*/20 * * * *", "America/New_York")
    now = local(NY, 2025, 11, 2, 1, 10, fold=1)  # 01:10 EST, the second pass
    assert spec.next_after(now) == local(NY, 2025, 11, 2, 2, 0)
    # The latest tick before it is 01:40 EDT, in the first pass.
    assert spec.prev_before(now) == local(NY, 2025, 11, 2, 1, 40, fold=0)


def test_prev_before_steps_over_the_skipped_hour() -> None:
    spec = compile_cron("0 * * * * *", "Europe/Berlin")  # every minute
    assert spec.prev_before(local(BERLIN, 2025, 3, 30, 3, 0, 30)) == local(
        BERLIN, 2025, 3, 30, 3, 0
    )
    assert spec.prev_before(local(BERLIN, 2025, 3, 30, 3, 0)) == local(BERLIN, 2025, 3, 30, 1, 59)


def test_hourly_in_berlin_over_both_changes() -> None:
    spec = compile_cron("0 * * * *", "Europe/Berlin")
    spring = walk(spec, local(BERLIN, 2025, 3, 30, 0, 30), 3)
    assert [t.astimezone(BERLIN).hour for t in spring] == [1, 3, 4]
    autumn = walk(spec, local(BERLIN, 2025, 10, 26, 1, 30), 3)
    assert [t.astimezone(BERLIN).hour for t in autumn] == [2, 3, 4]
    assert autumn[1] - autumn[0] == timedelta(hours=2)  # 02:00 CEST fired, 02:00 CET not


def test_firing_across_fall_back_through_an_injected_clock() -> None:
    """A schedule driven tick by tick by a fake clock: the repeated hour fires once."""
    spec = compile_cron("0 */30 * * * *", "America/New_York")
    clock = Clock(utc(2025, 11, 2, 4, 0))  # 00:00 EDT
    state = ScheduleState(spec.next_after(clock()), OVERLAP_ALLOW, CATCH_UP_FIRE_ONCE, 100)
    fired: list[datetime] = []
    while clock() <= utc(2025, 11, 2, 9, 0):  # through 04:00 EST
        decided = plan(spec, state, clock(), missed_before=utc(2025, 1, 1))
        fired += decided.fire
        state = ScheduleState(decided.next_fire_time, OVERLAP_ALLOW, CATCH_UP_FIRE_ONCE, 100)
        clock.advance(60)
    wall = [t.astimezone(NY).strftime("%H:%M%z") for t in fired]
    assert wall == [
        "00:30-0400",
        "01:00-0400",
        "01:30-0400",
        "02:00-0500",
        "02:30-0500",
        "03:00-0500",
        "03:30-0500",
        "04:00-0500",
    ]
    assert len(set(fired)) == len(fired)


def test_firing_across_spring_forward_through_an_injected_clock() -> None:
    spec = compile_cron("0 30 * * * *", "America/New_York")  # at :30 every hour
    clock = Clock(local(NY, 2025, 3, 9, 0, 0))
    state = ScheduleState(spec.next_after(clock()), OVERLAP_ALLOW, CATCH_UP_FIRE_ONCE, 100)
    fired: list[datetime] = []
    for _ in range(4 * 60):
        decided = plan(spec, state, clock(), missed_before=utc(2025, 1, 1))
        fired += decided.fire
        state = ScheduleState(decided.next_fire_time, OVERLAP_ALLOW, CATCH_UP_FIRE_ONCE, 100)
        clock.advance(60)
    # Four real hours from midnight EST end at 05:00 EDT; 02:30 did not exist.
    assert [t.astimezone(NY).strftime("%H:%M") for t in fired] == [
        "00:30",
        "01:30",
        "03:30",
        "04:30",
    ]


# -- catch-up ------------------------------------------------------------------------------

EVERY_SECOND = compile_cron("* * * * * *")
T0 = utc(2025, 6, 1, 12, 0, 0)


def missed_state(catch_up: int, limit: int = 100, overlap: int = OVERLAP_ALLOW) -> ScheduleState:
    # Down from T0 (the cursor) for 10 s; the new leader took office at T0+10.
    return ScheduleState(T0, overlap, catch_up, limit)


def test_catch_up_skip_fires_only_ticks_after_the_grace() -> None:
    decided = plan(
        EVERY_SECOND,
        missed_state(CATCH_UP_SKIP),
        T0 + timedelta(seconds=10.2),
        T0 + timedelta(seconds=9),
    )
    assert decided.missed
    assert decided.fire == [T0 + timedelta(seconds=s) for s in (9, 10)]
    assert decided.next_fire_time == T0 + timedelta(seconds=11)


def test_catch_up_fire_once_fires_the_latest_missed_tick() -> None:
    decided = plan(
        EVERY_SECOND,
        missed_state(CATCH_UP_FIRE_ONCE),
        T0 + timedelta(seconds=10.2),
        T0 + timedelta(seconds=9),
    )
    assert decided.fire == [T0 + timedelta(seconds=s) for s in (8, 9, 10)]


def test_catch_up_fire_all_fires_up_to_the_bound() -> None:
    now, missed_before = T0 + timedelta(seconds=10.2), T0 + timedelta(seconds=9)
    everything = plan(EVERY_SECOND, missed_state(CATCH_UP_FIRE_ALL), now, missed_before)
    assert everything.fire == [T0 + timedelta(seconds=s) for s in range(11)]
    bounded = plan(EVERY_SECOND, missed_state(CATCH_UP_FIRE_ALL, limit=3), now, missed_before)
    assert bounded.fire == [T0 + timedelta(seconds=s) for s in (6, 7, 8, 9, 10)]


def test_catch_up_after_a_long_outage_does_not_enumerate_it() -> None:
    # A year of second-level ticks missed: only the few fired are computed.
    cursor = T0 - timedelta(days=365)
    state = ScheduleState(cursor, OVERLAP_ALLOW, CATCH_UP_FIRE_ALL, 5)
    decided = plan(EVERY_SECOND, state, T0 + timedelta(seconds=0.5), T0 - timedelta(seconds=1))
    assert decided.fire == [T0 - timedelta(seconds=s) for s in (6, 5, 4, 3, 2)] + [
        T0 - timedelta(seconds=1),
        T0,
    ]


def test_no_missed_ticks_when_on_time() -> None:
    state = ScheduleState(T0, OVERLAP_ALLOW, CATCH_UP_SKIP, 100)
    decided = plan(EVERY_SECOND, state, T0 + timedelta(seconds=2.5), T0 - timedelta(seconds=60))
    assert not decided.missed
    assert decided.fire == [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]


def test_end_time_stops_ticks_and_the_cursor() -> None:
    state = ScheduleState(
        T0, OVERLAP_ALLOW, CATCH_UP_FIRE_ALL, 100, end_time=T0 + timedelta(seconds=2)
    )
    decided = plan(EVERY_SECOND, state, T0 + timedelta(seconds=5), T0 - timedelta(seconds=60))
    assert decided.fire == [T0, T0 + timedelta(seconds=1)]
    assert decided.next_fire_time is None


def test_a_runaway_backlog_is_fired_in_slices() -> None:
    state = ScheduleState(T0, OVERLAP_ALLOW, CATCH_UP_FIRE_ALL, 100)
    decided = plan(EVERY_SECOND, state, T0 + timedelta(hours=1), T0 - timedelta(seconds=60))
    assert len(decided.fire) == 1000
    assert decided.next_fire_time == T0 + timedelta(seconds=1000)


# -- overlap -------------------------------------------------------------------------------


def test_overlap_skip() -> None:
    busy = ScheduleState(T0, OVERLAP_SKIP, CATCH_UP_FIRE_ONCE, 100, previous_unfinished=True)
    decided = plan(EVERY_SECOND, busy, T0, T0 - timedelta(seconds=60))
    assert decided.fire == []
    assert decided.skipped == [T0]
    idle = ScheduleState(T0, OVERLAP_SKIP, CATCH_UP_FIRE_ONCE, 100, previous_unfinished=False)
    # Three due at once: the first fires, the others would overlap it.
    decided = plan(EVERY_SECOND, idle, T0 + timedelta(seconds=2), T0 - timedelta(seconds=60))
    assert decided.fire == [T0]
    assert decided.skipped == [T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]


def test_overlap_buffer_one() -> None:
    busy = ScheduleState(T0, OVERLAP_BUFFER_ONE, CATCH_UP_FIRE_ONCE, 100, previous_unfinished=True)
    decided = plan(EVERY_SECOND, busy, T0 + timedelta(seconds=1), T0 - timedelta(seconds=60))
    assert decided.fire == []
    assert decided.buffered_tick == T0
    assert decided.skipped == [T0 + timedelta(seconds=1)]
    # Later, the previous firing finished: the buffered tick fires, then the due one is
    # buffered behind it.
    after = ScheduleState(
        T0 + timedelta(seconds=2),
        OVERLAP_BUFFER_ONE,
        CATCH_UP_FIRE_ONCE,
        100,
        buffered_tick=T0,
        previous_unfinished=False,
    )
    decided = plan(EVERY_SECOND, after, T0 + timedelta(seconds=2), T0 - timedelta(seconds=60))
    assert decided.fire == [T0]
    assert decided.buffered_tick == T0 + timedelta(seconds=2)
    # Nothing due, only the buffered tick waiting for a finished previous firing.
    waiting = ScheduleState(
        T0 + timedelta(seconds=3), OVERLAP_BUFFER_ONE, CATCH_UP_FIRE_ONCE, 100, buffered_tick=T0
    )
    decided = plan(EVERY_SECOND, waiting, T0 + timedelta(seconds=2.5), T0 - timedelta(seconds=60))
    assert decided.fire == [T0]
    assert decided.buffered_tick is None
    assert decided.next_fire_time == T0 + timedelta(seconds=3)


def test_overlap_allow_fires_everything() -> None:
    state = ScheduleState(T0, OVERLAP_ALLOW, CATCH_UP_FIRE_ONCE, 100, previous_unfinished=True)
    decided = plan(EVERY_SECOND, state, T0 + timedelta(seconds=1), T0 - timedelta(seconds=60))
    assert decided.fire == [T0, T0 + timedelta(seconds=1)]


# -- helpers -------------------------------------------------------------------------------


def test_first_tick_respects_start_time() -> None:
    spec = compile_cron("0 * * * *")
    assert first_tick(spec, utc(2025, 1, 1, 0, 30), None) == utc(2025, 1, 1, 1)
    assert first_tick(spec, utc(2025, 1, 1, 0, 30), utc(2025, 1, 1, 5)) == utc(2025, 1, 1, 5)
    assert first_tick(spec, utc(2025, 1, 1, 0, 30), utc(2025, 1, 1, 5, 1)) == utc(2025, 1, 1, 6)


def test_next_fire_times_stop_at_the_end() -> None:
    spec = compile_cron("0 * * * *")
    times = next_fire_times(spec, utc(2025, 1, 1, 1), 5, utc(2025, 1, 1, 3))
    assert times == [utc(2025, 1, 1, 1), utc(2025, 1, 1, 2)]


def test_idempotency_keys_are_deterministic_utc() -> None:
    schedule_id = uuid.UUID("01a22073-c0d9-7e95-84d1-aa6c546c3b12")
    tick = local(BERLIN, 2025, 7, 1, 9, 0)
    assert idempotency_key(schedule_id, tick) == (
        "schedule:01a22073-c0d9-7e95-84d1-aa6c546c3b12:2025-07-01T07:00:00Z"
    )
    assert idempotency_key(schedule_id, tick) == idempotency_key(schedule_id, tick.astimezone(NY))
