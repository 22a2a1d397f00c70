"""Formatting for people (rich tables, detail blocks) and programs (JSON).

Tables are plain columns (no borders) so that ``grep`` and ``awk`` work on them; colour
only on a terminal. Every value a user supplied is printed as text, never as rich markup.
Times carry their zone: the local one for tasks, the schedule's own for schedules.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, tzinfo
from enum import Enum
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from conveyor.transport._encryption import envelope_key_id, is_sealed

# Wide enough that no table is ever wrapped when stdout is a pipe or a file.
_PIPE_WIDTH = 10_000


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width, or no width limit on a pipe."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(
        file=stream,
        width=shutil.get_terminal_size().columns if tty else _PIPE_WIDTH,
        highlight=False,
        soft_wrap=not tty,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes) and is_sealed(value):  # what no key of this CLI opened
        return {
            "encrypted_with_key": envelope_key_id(value),
            "base64": base64.b64encode(value).decode(),
        }
    if isinstance(value, bytes):
        try:
            return json.loads(value) if value else None
        except ValueError:
            return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """A client dataclass (or a list of them) as JSON-ready data; payloads decoded."""
    if isinstance(value, list):
        return [_plain(asdict(v)) for v in value]
    return _plain(asdict(value))


def to_json(value: Any) -> str:
    """JSON text for a client dataclass, a list of them, or a dict from :func:`plain`."""
    return json.dumps(value if isinstance(value, dict) else plain(value), indent=2)


def short(data: bytes | str, limit: int = 60) -> str:
    """Text of at most ``limit`` characters (an ellipsis marks a cut); an encrypted payload
    or result is named as such, not printed as the bytes it is."""
    if isinstance(data, bytes) and is_sealed(data):
        return (
            f"(encrypted with key {envelope_key_id(data)!r}: --encryption-key-file with "
            "that key shows it)"
        )
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[: limit - 1] + "…"


def when(value: datetime | None, zone: tzinfo | None = None) -> str:
    """A time in ``zone`` (default: this machine's), with the zone's name."""
    if value is None:
        return "-"
    local = value.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or local.strftime("%z"))


def state_name(state: Enum | str) -> str:
    """A state or outcome as the CLI writes it: lower case, words apart (``not started``)."""
    text = state.value if isinstance(state, Enum) else state
    return str(text).lower().replace("_", " ")


def attempts_text(attempt: int, max_attempts: int, uncounted: int = 0) -> str:
    """``3 of 3``, or ``3 of 3 (6 in all)`` when some attempts did not count."""
    counted = max(attempt - uncounted, 0)
    text = f"{counted} of {max_attempts}"
    return f"{text} ({attempt} in all)" if uncounted > 0 else text


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    """Plain aligned columns with bold headers."""
    grid = Table(
        box=None,
        show_edge=False,
        pad_edge=False,
        padding=(0, 2, 0, 0),
        header_style="bold",
    )
    for i, header in enumerate(headers):
        # The first column is usually an id: never cut it.
        grid.add_column(header, no_wrap=i == 0, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(str(cell)) for cell in row))
    return grid


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 0) -> None:
    """Prints a :func:`table`; on a pipe as plain text without trailing blanks."""
    out = console()
    grid = table(headers, rows)
    if out.is_terminal:
        out.print(Padding(grid, (0, 0, 0, indent), expand=False) if indent else grid)
        return
    with out.capture() as captured:
        out.print(grid)
    prefix = " " * indent
    lines = [prefix + line.rstrip() for line in captured.get().splitlines()]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def tally(value: int, capped: bool) -> int | str:
    """A task count as a table shows it: a capped one (ListQueues counts up to a cap) as
    at least that many, ``10000+``."""
    return f"{value}+" if capped else value


def print_text(text: str) -> None:
    """Prints user-supplied text as is (no markup)."""
    print(text, flush=True)
