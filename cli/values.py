"""Number and time flags of the CLI, held to the ranges the coordinator accepts.

A flag's value is checked where it is parsed, against the one range of its kind
(``conveyor.coordinator.bounds``) or the request limit of its field (``validation``), so
a value out of range is a one-line usage error naming the flag, never a traceback from
a conversion deeper down (a ``--delay`` of 1e300 overflowed ``timedelta``, a
``--priority`` past int32 the protobuf field). The coordinator's modules are imported
when a flag is parsed, not before: ``conveyor --help`` stays quick.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

import typer

#: One part of a duration: a number and its unit (none: seconds).
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|[smhdw]?)")
_UNITS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: What every duration flag shows in its help.
DURATION = "DURATION"
DURATION_EXAMPLES = "a duration such as 30s, 1h30m, 90d, 500ms or 2.5 (seconds)"


def duration_seconds(text: str) -> float:
    """Seconds in ``text``, the one duration syntax of every flag: a number (seconds), or
    numbers with units (``ms``, ``s``, ``m``, ``h``, ``d``, ``w``) run together, as ``1h30m``.

    Raises:
        typer.BadParameter: Not such a duration (``nan``, ``inf`` and signs included).
    """
    compact = text.strip().lower()
    parts = _PART.findall(compact)
    whole = "".join(number + unit for number, unit in parts)
    # A bare number stands alone: "1h30" could mean seconds or minutes.
    if not parts or whole != compact or (len(parts) > 1 and not all(u for _, u in parts)):
        raise typer.BadParameter(f"{text!r} is not {DURATION_EXAMPLES}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def seconds(lowest: float | None = None, highest: float | None = None) -> Callable[[str], float]:
    """A parser for a duration flag (:func:`duration_seconds`), held from ``lowest`` to
    ``highest`` seconds (by default the duration range: a millisecond to a day)."""

    def parse(text: str) -> float:
        from conveyor.coordinator import bounds

        try:
            value = float(text)
        except ValueError:
            value = duration_seconds(text)
        problem = bounds.seconds_problem(
            value,
            lowest=bounds.SECONDS_MIN if lowest is None else lowest,
            highest=bounds.SECONDS_MAX if highest is None else highest,
        )
        if problem is not None:
            raise typer.BadParameter(f"{text} {problem}")
        return value

    return parse


def delay(text: str) -> float:
    """Seconds from now a task may be delayed by (run_at within a year, as validated)."""
    from conveyor.coordinator.api import validation

    return seconds(0.0, validation.MAX_RUN_AT_AHEAD.total_seconds())(text)


def _whole(text: str, lowest: int, highest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a whole number") from None
    if not lowest <= value <= highest:
        raise typer.BadParameter(f"{text} must be between {lowest} and {highest}")
    return value


def priority(text: str) -> int:
    from conveyor.coordinator.api import validation

    return _whole(text, -validation.MAX_PRIORITY, validation.MAX_PRIORITY)


def max_attempts(text: str) -> int:
    from conveyor.coordinator.api import validation

    return _whole(text, 1, validation.MAX_ATTEMPTS)


def catch_up_limit(text: str) -> int:
    from conveyor.coordinator.schedules import validation as schedule_validation

    return _whole(text, 1, schedule_validation.MAX_CATCH_UP_LIMIT)


def instant(text: str) -> datetime:
    """An ISO 8601 time with a UTC offset, within the time range every layer holds."""
    from conveyor.coordinator import bounds

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time such as 2030-01-01T09:00:00+01:00"
        ) from None
    if value.tzinfo is None:
        raise typer.BadParameter(f"{text!r} needs a UTC offset (or Z)")
    problem = bounds.time_problem(value)
    if problem is not None:
        raise typer.BadParameter(f"{text} {problem}")
    return value


def label(text: str) -> str:
    """A ``--label KEY=VALUE`` (the coordinator holds the key and value to its rules)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"{text!r} is not KEY=VALUE, such as team=billing")
    return text


def labels(pairs: list[str] | None) -> dict[str, str]:
    """The labels of repeated ``--label KEY=VALUE`` flags (checked by :func:`label`); a
    key given twice keeps its last value."""
    found: dict[str, str] = {}
    for pair in pairs or ():
        key, _, value = pair.partition("=")
        found[key.strip()] = value.strip()
    return found
