"""How the console shows values: times, durations, payloads, errors (pure functions).

Everything here returns plain text; the templates escape it (autoescape is on for every
template), so nothing a task carries (a payload, a label, an error, a worker id) can
become markup. Payloads are shown as they are *safe* to show: JSON pretty-printed, text
as text, other bytes as hex, an encrypted envelope as a note that names its key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from conveyor.transport._encryption import envelope_key_id, is_sealed

__all__ = [
    "ErrorView",
    "PayloadView",
    "ScheduleTick",
    "ago",
    "duration",
    "error_view",
    "made_by_schedule",
    "payload_view",
    "stamp",
]

#: Largest payload or result shown whole; the rest is cut (the API has the whole of it).
SHOWN_BYTES = 64 * 1024
_HEX_BYTES = 512


def stamp(when: datetime | None) -> str:
    """``2025-03-01 12:30:15Z`` (UTC, to the second); ``-`` for no time."""
    if when is None:
        return "-"
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(delta: timedelta | None) -> str:
    """A span as a person reads it: ``850 ms``, ``3.2 s``, ``4 min 10 s``, ``2 h 5 min``."""
    if delta is None:
        return "-"
    seconds = delta.total_seconds()
    if seconds < 0:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        big, small = (whole // 60, "min"), (whole % 60, "s")
    elif whole < 86400:
        big, small = (whole // 3600, "h"), (whole % 3600 // 60, "min")
    else:
        big, small = (whole // 86400, "d"), (whole % 86400 // 3600, "h")
    return f"{big[0]} {big[1]}" + (f" {small[0]} {small[1]}" if small[0] else "")


def ago(when: datetime | None, now: datetime) -> str:
    """How long before ``now`` ``when`` was (``3.2 s``, ``4 min 10 s``); ``-`` for none."""
    if when is None:
        return "-"
    return duration(max(now - when, timedelta(0)))


def tally(value: int, capped: bool = False) -> str:
    """A task count with thousands separators; a capped one (ListQueues counts up to a
    cap) as at least that many: ``10,000+``."""
    return f"{value:,}+" if capped else f"{value:,}"


@dataclass(frozen=True, slots=True)
class PayloadView:
    """A payload or result, ready to show as text."""

    #: ``json``, ``text``, ``binary``, ``encrypted`` or ``empty``.
    kind: str
    #: What to show (pretty JSON, the text, a hex dump); empty for ``encrypted``.
    text: str
    #: A line about it: its size, its content type, what was left out.
    note: str


def payload_view(data: bytes, content_type: str) -> PayloadView:
    """How to show ``data`` of ``content_type``, safely and at most :data:`SHOWN_BYTES`."""
    size = f"{len(data):,} bytes, {content_type or 'no content type'}"
    if not data:
        return PayloadView("empty", "", f"empty ({content_type or 'no content type'})")
    if is_sealed(data):
        return PayloadView(
            "encrypted",
            "",
            f"encrypted end to end with key {envelope_key_id(data)!r} ({len(data):,} bytes): "
            "the coordinator, and this console, hold only ciphertext",
        )
    cut = len(data) > SHOWN_BYTES
    shown = data[:SHOWN_BYTES]
    more = f"; the first {SHOWN_BYTES:,} shown" if cut else ""
    if not cut and _is_json(content_type):
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            pass  # not JSON after all: shown as text or bytes below
        else:
            pretty = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
            return PayloadView("json", pretty, size)
    try:
        text = shown.decode()
    except UnicodeDecodeError as exc:
        # A cut through a multi-byte character is still text.
        text = shown[: exc.start].decode() if cut and exc.start >= len(shown) - 3 else ""
        if not text:
            return _binary(data, size)
    if _CONTROL.search(text):
        return _binary(data, size)
    return PayloadView("text", text, size + more)


# Control characters other than tab and line ends: bytes, not text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _binary(data: bytes, size: str) -> PayloadView:
    left = f"; the first {_HEX_BYTES} as hex" if len(data) > _HEX_BYTES else ""
    return PayloadView("binary", _hex(data[:_HEX_BYTES]), size + left)


def _is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


def _hex(data: bytes) -> str:
    return "\n".join(
        f"{offset:08x}  {data[offset : offset + 16].hex(' ')}" for offset in range(0, len(data), 16)
    )


@dataclass(frozen=True, slots=True)
class ErrorView:
    """A task's error: its first line, the rest (the traceback), and its fingerprint."""

    summary: str
    detail: str
    #: What groups failures in the dead-letter view: the error's class and first line.
    fingerprint: str


def error_view(text: str | None) -> ErrorView | None:
    """Splits an error as the worker SDKs write it (``Type: message``, a blank line, the
    traceback); ``None`` for no error."""
    if not text:
        return None
    summary, _, rest = text.strip("\n").partition("\n")
    return ErrorView(summary, rest.strip("\n"), summary.strip())


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    """The schedule firing a task came from, read off its idempotency key."""

    schedule_id: str
    tick: str


# The key a schedule's firing gets: schedule:<schedule id>:<tick as UTC ISO 8601>.
_SCHEDULE_KEY = re.compile(r"schedule:([0-9a-f-]{36}):(\d{4}-\d\d-\d\dT[0-9:.]+Z)")


def made_by_schedule(idempotency_key: str | None) -> ScheduleTick | None:
    """The schedule and tick that made a task, when its idempotency key says so."""
    if not idempotency_key:
        return None
    match = _SCHEDULE_KEY.fullmatch(idempotency_key)
    return ScheduleTick(match.group(1), match.group(2)) if match else None
