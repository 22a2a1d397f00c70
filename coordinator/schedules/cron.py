"""Cron ticks in a time zone, and what a schedule fires when: pure logic, no I/O, no clock.

Ticks
-----
A schedule's ticks are the wall-clock times its cron expression matches in its time zone,
mapped to UTC (croniter does the matching, on naive wall-clock times):

- a wall time that does not exist (the hour skipped when clocks go forward) is no tick;
- a wall time that exists twice (the hour repeated when clocks go back) is one tick, at
  its first occurrence.

So ticks are strictly increasing in UTC and no wall time fires twice. Expressions have 5
fields (minute hour day-of-month month day-of-week), or 6 with seconds first, or are one
of croniter's aliases (@hourly, @daily, ...).

croniter costs 10-30 us per step, too much for thousands of second-level schedules, so a
:class:`CronSpec` is compiled once per (expression, zone) and shared, and stepping from a
tick to the next one within the same minute reads the expanded seconds field instead.

Firing
------
:func:`plan` decides, for one due schedule, which ticks fire now and where its cursor
(``next_fire_time``, the earliest tick not handled yet) moves. Ticks that fell due more
than a grace period before the current leader took office were *missed* (downtime,
failover) and follow the catch-up policy; later ones are fired however late they are.
Then the overlap policy is applied tick by tick, in order, as if each were handled alone.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# croniter ships no type information (types-croniter is not a dependency).
from croniter import CroniterError, croniter  # type: ignore[import-untyped]

OVERLAP_ALLOW, OVERLAP_SKIP, OVERLAP_BUFFER_ONE = 1, 2, 3
CATCH_UP_SKIP, CATCH_UP_FIRE_ONCE, CATCH_UP_FIRE_ALL = 1, 2, 3

# Plenty for any real expression; an expression with no match within it is refused.
_MAX_YEARS_BETWEEN_MATCHES = 10
# Longest clock change there is (Antarctica/Troll: 2 h); the binary searches for the
# edges of a skipped or repeated stretch of wall time look this far.
_MAX_CLOCK_CHANGE = timedelta(hours=3)
_SECOND = timedelta(seconds=1)
_SECONDS = tuple(timedelta(seconds=s) for s in range(61))
# Every zone's UTC offset is a whole number of minutes since 1972 (Liberia was the last
# with seconds), so from then on a tick's second is the same in UTC and on the wall clock.
_WHOLE_MINUTE_OFFSETS_SINCE = datetime(1973, 1, 1, tzinfo=UTC)
# plan() fires at most this many on-time ticks of one schedule per call; the rest are
# left due and fired by the next call, so one runaway schedule cannot stall a batch.
MAX_TICKS_PER_PLAN = 1000


class CronError(ValueError):
    """An invalid cron expression or time zone; the message says what is wrong."""


def load_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; CronError when there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(
            f"{name[:64]!r} is not an IANA time zone (such as UTC, Europe/Berlin)"
        ) from None


@functools.lru_cache(maxsize=8192)
def compile_cron(expression: str, time_zone: str = "UTC") -> CronSpec:
    """The compiled ``expression`` in ``time_zone``; shared, so compile once per pair."""
    return CronSpec(expression, time_zone)


class CronSpec:
    """A cron expression in a time zone: finds ticks before and after any instant.

    Not thread-safe (it reuses one croniter); the coordinator uses it from one event loop.
    """

    def __init__(self, expression: str, time_zone: str = "UTC") -> None:
        self.expression = expression
        self.time_zone = time_zone
        self._zone: ZoneInfo | None = None if time_zone == "UTC" else load_zone(time_zone)
        fields = expression.split()
        seconds_first = len(fields) == 6
        if not (len(fields) == 5 or seconds_first or (len(fields) == 1 and fields[0][:1] == "@")):
            raise CronError(
                "must have 5 fields (minute hour day-of-month month day-of-week), 6 with "
                "seconds first, or be an alias such as @hourly"
            )
        try:
            self._iter = croniter(
                expression,
                datetime(2000, 1, 1),
                second_at_beginning=seconds_first,
                max_years_between_matches=_MAX_YEARS_BETWEEN_MATCHES,
            )
        except (CroniterError, ValueError, KeyError) as exc:
            raise CronError(f"is not a valid cron expression ({exc})") from None
        seconds = self._iter.expanded[5] if seconds_first else [0]
        self._seconds: tuple[int, ...] = (
            tuple(range(60)) if seconds == ["*"] else tuple(sorted(int(s) for s in seconds))
        )
        # Offset of the last wall-clock minute mapped to UTC (None: the minute does not
        # exist). Clock changes happen on whole minutes, so a minute has one answer.
        self._minute: datetime | None = None
        self._minute_offset: timedelta | None = None
        self._last: tuple[datetime, datetime | None] | None = None
        """The last next_after question and answer."""
        try:
            if self.next_after(datetime(2000, 1, 1, tzinfo=UTC)) is None:
                raise CronError(f"matches no time within {_MAX_YEARS_BETWEEN_MATCHES} years")
        except CroniterError as exc:  # pragma: no cover - croniter's own corner cases
            raise CronError(f"is not a valid cron expression ({exc})") from None

    def __repr__(self) -> str:
        return f"CronSpec({self.expression!r}, {self.time_zone!r})"

    # -- public ------------------------------------------------------------------------

    def next_after(self, t: datetime, *, is_tick: bool = False) -> datetime | None:
        """The first tick strictly after ``t`` (aware), in UTC; None if none is left.

        ``is_tick`` says ``t`` is itself a tick, which allows the fast same-minute step.
        """
        # The schedules of one expression share this spec and, in a firing round, their
        # tick: 90,000 per-minute schedules ask for the same next tick, each a croniter
        # step (10-30 us) when the answer leaves the minute. The answer depends on t only.
        last = self._last
        if last is not None and last[0] == t:
            return last[1]
        answer = self._next_after(t, is_tick)
        self._last = (t, answer)
        return answer

    def _next_after(self, t: datetime, is_tick: bool) -> datetime | None:
        if is_tick and not t.microsecond and t >= _WHOLE_MINUTE_OFFSETS_SINCE:
            # The next allowed second of the same minute, if any, is the next tick: the
            # minute matched already, and a minute is one piece of wall time (clock
            # changes happen between minutes), so the step is the same in UTC.
            seconds = self._seconds
            i = bisect.bisect_right(seconds, t.second)
            if i < len(seconds):
                return t + _SECONDS[seconds[i] - t.second]
        if self._zone is None:
            wall = t.astimezone(UTC).replace(tzinfo=None)
        else:
            local = t.astimezone(self._zone)
            wall = local.replace(tzinfo=None)
            if local.fold == 1 and self._ambiguous(wall):
                # In the second pass of a repeated stretch: every wall time up to its end
                # fired during the first pass, which is before t.
                wall = self._edge(wall, self._ambiguous) - _SECOND
                is_tick = False
        while True:
            candidate = self._next_wall(wall, is_tick)
            if candidate is None:
                return None
            utc = self._to_utc(candidate)
            if utc is None:  # skipped by a clock change: resume after the skipped stretch
                wall = self._edge(candidate, self._skipped) - _SECOND
                is_tick = False
                continue
            if utc > t:
                return utc
            wall, is_tick = candidate, True  # pragma: no cover - defensive

    def prev_before(self, t: datetime) -> datetime | None:
        """The last tick strictly before ``t`` (aware), in UTC; None if none within range."""
        if self._zone is None:
            wall = t.astimezone(UTC).replace(tzinfo=None)
        else:
            local = t.astimezone(self._zone)
            wall = local.replace(tzinfo=None)
            if local.fold == 1 and self._ambiguous(wall):
                # Wall times up to the end of the repeated stretch had their (only) tick
                # in the first pass, before t.
                wall = self._edge(wall, self._ambiguous)
        while True:
            candidate = self._prev_wall(wall)
            if candidate is None:
                return None
            utc = self._to_utc(candidate)
            if utc is None:  # skipped: continue before the skipped stretch
                wall = self._edge(candidate, self._skipped, backwards=True) + _SECOND
                continue
            if utc < t:
                return utc
            wall = candidate  # pragma: no cover - defensive

    def ticks_through(
        self, first: datetime, until: datetime, limit: int
    ) -> tuple[list[datetime], datetime | None]:
        """The ticks from ``first`` (a tick) through ``until``, at most ``limit`` of them,
        oldest first; and the tick after the last of them (None if there is none)."""
        out = [first]
        tick = self.next_after(first, is_tick=True)
        while tick is not None and tick <= until and len(out) < limit:
            out.append(tick)
            tick = self.next_after(tick, is_tick=True)
        return out, tick

    # -- wall clock --------------------------------------------------------------------

    def _next_wall(self, wall: datetime, is_tick: bool) -> datetime | None:
        if is_tick:
            seconds = self._seconds
            i = bisect.bisect_right(seconds, wall.second)
            if i < len(seconds):
                # wall matched minute, hour and day fields, so any later allowed second
                # of the same minute is the next match.
                return wall.replace(second=seconds[i], microsecond=0)
        it = self._iter
        it.set_current(wall, force=True)
        try:
            nxt: datetime = it.get_next(datetime)
        except CroniterError:
            return None
        return nxt

    def _prev_wall(self, wall: datetime) -> datetime | None:
        it = self._iter
        # croniter steps back strictly before a whole second; a fractional wall time has
        # its own whole second before it, so start one second later.
        if wall.microsecond:
            wall = wall.replace(microsecond=0) + _SECOND
        it.set_current(wall, force=True)
        try:
            prev: datetime = it.get_prev(datetime)
        except CroniterError:
            return None
        return prev

    # -- time zone ---------------------------------------------------------------------

    def _to_utc(self, wall: datetime) -> datetime | None:
        """The UTC instant of a wall time (first occurrence); None if it does not exist."""
        if self._zone is None:
            return wall.replace(tzinfo=UTC)
        minute = wall.replace(second=0, microsecond=0)
        if minute != self._minute:
            self._minute = minute
            self._minute_offset = _offset(minute, self._zone)
        offset = self._minute_offset
        if offset is None:
            return None
        return (wall - offset).replace(tzinfo=UTC)

    def _skipped(self, wall: datetime) -> bool:
        assert self._zone is not None
        return _offset(wall, self._zone) is None

    def _ambiguous(self, wall: datetime) -> bool:
        zone = self._zone
        assert zone is not None
        return (
            wall.replace(tzinfo=zone, fold=0).utcoffset()
            != wall.replace(tzinfo=zone, fold=1).utcoffset()
            and _offset(wall, zone) is not None
        )

    def _edge(
        self, wall: datetime, inside: Callable[[datetime], bool], *, backwards: bool = False
    ) -> datetime:
        """The first wall time after (or the last before) ``wall`` that is not ``inside``.

        ``wall`` is inside a skipped or repeated stretch; both are one contiguous stretch
        shorter than _MAX_CLOCK_CHANGE, found to the second by bisection.
        """
        wall = wall.replace(microsecond=0)
        step = -_SECOND if backwards else _SECOND
        lo, hi = 0, int(_MAX_CLOCK_CHANGE / _SECOND)  # inside at lo, outside at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if inside(wall + mid * step):
                lo = mid
            else:
                hi = mid
        return wall + hi * step


def _offset(wall: datetime, zone: ZoneInfo) -> timedelta | None:
    """UTC offset of a wall time at its first occurrence; None if it does not exist."""
    local = wall.replace(tzinfo=zone, fold=0)
    offset = local.utcoffset()
    assert offset is not None
    back = (wall - offset).replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
    return offset if back == wall else None


# -- firing decisions ------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleState:
    """What :func:`plan` needs to know about one due schedule."""

    next_fire_time: datetime | None
    """The earliest tick not handled yet (a tick of the schedule), or None."""
    overlap_policy: int
    catch_up_policy: int
    catch_up_limit: int
    end_time: datetime | None = None
    buffered_tick: datetime | None = None
    """BUFFER_ONE: a tick waiting for the previous firing to finish."""
    previous_unfinished: bool = False
    """The latest firing's task is not finished (PENDING, SCHEDULED or RUNNING)."""


@dataclass(frozen=True)
class Plan:
    """What to do with one due schedule now."""

    fire: list[datetime]
    """Ticks to fire now, oldest first (a buffered tick included)."""
    next_fire_time: datetime | None
    """The new cursor: the earliest tick not handled; None when no tick is left."""
    buffered_tick: datetime | None
    skipped: list[datetime] = field(default_factory=list)
    """Due ticks the overlap policy skipped."""
    missed: bool = False
    """Some ticks were missed; the catch-up policy decided which of them fire."""


def plan(spec: CronSpec, state: ScheduleState, now: datetime, missed_before: datetime) -> Plan:
    """Decides which ticks of a due schedule fire at ``now``.

    ``missed_before``: ticks earlier than this were missed (they fell due well before this
    leader took office) and follow the catch-up policy; the rest fire however late.
    """
    cursor = state.next_fire_time
    end = state.end_time
    due: list[datetime] = []
    missed = False
    if cursor is not None and end is not None and cursor >= end:
        cursor = None
    if cursor is not None and cursor <= now and cursor < missed_before:
        missed = True
        until = missed_before if end is None else min(missed_before, end)
        due.extend(_latest_missed(spec, state, cursor, until))
        cursor = spec.next_after(missed_before - timedelta(microseconds=1))
        if cursor is not None and end is not None and cursor >= end:
            cursor = None
    if cursor is not None and cursor <= now:
        on_time, cursor = spec.ticks_through(cursor, now, MAX_TICKS_PER_PLAN)
        due.extend(on_time)
        if end is not None:
            due = [t for t in due if t < end]
            if cursor is not None and cursor >= end:
                cursor = None
    fire, skipped, buffered = _overlap(state, due)
    return Plan(fire, cursor, buffered, skipped, missed)


def _latest_missed(
    spec: CronSpec, state: ScheduleState, cursor: datetime, until: datetime
) -> list[datetime]:
    """The missed ticks in ``[cursor, until)`` the catch-up policy fires, oldest first."""
    policy = state.catch_up_policy
    if policy == CATCH_UP_SKIP:
        return []
    keep = max(1, state.catch_up_limit) if policy == CATCH_UP_FIRE_ALL else 1
    latest: list[datetime] = []
    tick: datetime | None = until
    while len(latest) < keep:
        assert tick is not None
        tick = spec.prev_before(tick)
        if tick is None or tick < cursor:
            break
        latest.append(tick)
    latest.reverse()
    return latest


def _overlap(
    state: ScheduleState, due: list[datetime]
) -> tuple[list[datetime], list[datetime], datetime | None]:
    """Applies the overlap policy to the due ticks, in order: (fire, skipped, buffered)."""
    policy = state.overlap_policy
    if policy not in (OVERLAP_SKIP, OVERLAP_BUFFER_ONE):
        return due, [], None
    fire: list[datetime] = []
    skipped: list[datetime] = []
    unfinished = state.previous_unfinished
    buffered = state.buffered_tick if policy == OVERLAP_BUFFER_ONE else None
    if buffered is not None and not unfinished:
        fire.append(buffered)
        buffered, unfinished = None, True
    for tick in due:
        if not unfinished:
            fire.append(tick)
            unfinished = True  # the firing just made is unfinished
        elif policy == OVERLAP_BUFFER_ONE and buffered is None:
            buffered = tick
        else:
            skipped.append(tick)
    return fire, skipped, buffered


def first_tick(spec: CronSpec, now: datetime, start: datetime | None) -> datetime | None:
    """The first tick of a schedule (re)started at ``now``: after now, at or after start."""
    after = now
    if start is not None and start > now:
        after = start - timedelta(microseconds=1)
    return spec.next_after(after)


def next_fire_times(
    spec: CronSpec, first: datetime | None, count: int, end: datetime | None
) -> list[datetime]:
    """``first`` and the ticks after it, ``count`` in all, stopping before ``end``."""
    out: list[datetime] = []
    tick = first
    while tick is not None and len(out) < count and (end is None or tick < end):
        out.append(tick)
        tick = spec.next_after(tick, is_tick=True)
    return out


def utc_now() -> datetime:
    return datetime.now(UTC)
