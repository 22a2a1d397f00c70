"""The security commands' arguments are refused in one line before anything reaches a
coordinator or, with --dsn, PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conveyor.cli.errors import CLIError
from conveyor.cli.keys_commands import parse_duration


def test_durations() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration(" 12h ") == timedelta(hours=12)
    for text in ("0d", "-1d", "soon", "9999999999999d", "99999999w"):
        with pytest.raises(CLIError):
            parse_duration(text)
