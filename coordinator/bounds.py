"""The one range of each kind of value Conveyor accepts, checked here and nowhere else.

Every timestamp, duration, rate and count that comes in (an RPC field, a CLI flag, a
setting) is held to the range below for its kind, so a value is refused at the door
unless every layer that will carry it can: PostgreSQL, Python's ``datetime``, protobuf's
``Timestamp`` and ``Duration``, gRPC's integer options and the cron arithmetic. Nothing is
stored that cannot be read back.

Why these ranges:

- **Timestamps**: 1970-01-01T00:00:00Z to 9000-01-01T00:00:00Z. protobuf and ``datetime``
  hold the years 1 to 9999, but not their edges: asyncpg writes datetime's first and last
  microsecond as PostgreSQL's ``-infinity`` and ``infinity``, which read back as naive
  datetimes nothing can compare; cron arithmetic looks up to 10 years past a tick, and a
  time zone moves a wall time by up to a day. A thousand years of margin at the top and
  the Unix epoch at the bottom leave every step room.
- **Durations** (seconds of a setting, a timeout, a wait): above 0 and at most a day.
  Longer than any lease, heartbeat, refresh or timeout needs, and what ``Duration``,
  ``timedelta``, PostgreSQL's intervals and gRPC's int32 milliseconds all hold.
- **Rates** (per second): 0 for no limit, else 0.001 (one every 1000 s) to 10^9. A slower
  rate makes waits of hours (its RetryInfo would say days), a faster one is no limit but
  in name; NaN and infinity are no rates.
- **Counts** (backlog, burst, schedules, bytes): 0 to 2^62, what PostgreSQL's bigint and a
  float hold exactly enough.
- **RetryInfo**: at most :data:`RETRY_AFTER_MAX`; a client told to wait longer would
  rather be told to come back and ask again.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(9000, 1, 1, tzinfo=UTC)
TIME_RANGE = "between 1970-01-01T00:00:00Z and 9000-01-01T00:00:00Z"

SECONDS_MIN = 0.001
SECONDS_MAX = 86_400.0
"""Durations: one millisecond to one day."""

RATE_MIN = 0.001
RATE_MAX = 1e9
"""Rates per second (0 is "no limit", kept apart)."""

COUNT_MAX = 2**62

RETRY_AFTER_MAX = 300.0
"""The longest wait a RetryInfo tells a client."""


def time_problem(value: datetime) -> str | None:
    """What is wrong with an (aware) instant, or None."""
    if not TIME_MIN <= value <= TIME_MAX:
        return f"must be {TIME_RANGE}"
    return None


def seconds_problem(
    value: float, *, lowest: float = SECONDS_MIN, highest: float = SECONDS_MAX
) -> str | None:
    """What is wrong with a duration in seconds (``lowest`` to ``highest``: by default
    the duration range), or None. NaN and infinity are refused."""
    if not lowest <= value <= highest:
        return f"must be between {lowest:g} and {highest:g} seconds"
    return None


def rate_problem(value: float) -> str | None:
    """What is wrong with a rate per second (0: no limit), or None."""
    if value == 0 or RATE_MIN <= value <= RATE_MAX:
        return None
    return f"must be 0 (no limit) or between {RATE_MIN:g} and {RATE_MAX:g} per second"


def count_problem(value: int, *, lowest: int = 0, highest: int = COUNT_MAX) -> str | None:
    """What is wrong with a count (``lowest`` to ``highest``), or None."""
    if not lowest <= value <= min(highest, COUNT_MAX):
        return f"must be between {lowest} and {min(highest, COUNT_MAX)}"
    return None


MAX_DISPATCH_WEIGHT = 5
"""The largest tenant dispatch weight: a claim of FAIR_QUANTUM (100) times it is then
MAX_CLAIM_PER_SESSION (500), the most one claim takes anyway."""


def limit_problem(name: str, value: float) -> str | None:
    """What is wrong with the value of a tenant limit (the ``tenants`` columns, the
    coordinator's defaults), or None. 0 is "no limit" for each (but ``dispatch_weight``,
    a share: 1 to MAX_DISPATCH_WEIGHT)."""
    if name == "submit_rate":
        return rate_problem(value)
    if name == "dispatch_weight":
        # Not a limit: a share, 1 (the default) to MAX_DISPATCH_WEIGHT.
        if isinstance(value, float) and not value.is_integer():
            return "must be a whole number"
        return count_problem(int(value), lowest=1, highest=MAX_DISPATCH_WEIGHT)
    if isinstance(value, float) and not value.is_integer():
        return "must be a whole number"
    if not 0 <= value <= COUNT_MAX:
        return f"must be 0 (no limit) or positive, at most {COUNT_MAX}"
    return None


def retry_delay(seconds: float) -> float:
    """``seconds`` as a RetryInfo may carry it: 0 to RETRY_AFTER_MAX (NaN: the ceiling)."""
    if math.isnan(seconds):
        return RETRY_AFTER_MAX
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)
