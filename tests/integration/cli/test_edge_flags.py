"""Every number and time flag of the CLI has the range the coordinator accepts (issue 15):
a value at the edge of its type is one line naming the flag, exit code 2, nothing sent.
Before, ``--delay 1e300`` or ``--priority 99999999999`` ended in a traceback."""

from __future__ import annotations

import pytest
from clitools import conveyor

# Nothing listens there: a flag that passed would fail to connect instead (exit code 1).
NOWHERE = ["--coordinator", "127.0.0.1:1", "--rpc-timeout", "1"]
CASES = [
    ("submit", "t", "--delay", "1e300"),
    ("submit", "t", "--delay", "nan"),
    ("submit", "t", "--delay", "-1"),
    ("submit", "t", "--timeout", "1e300"),
    ("submit", "t", "--timeout", "inf"),
    ("submit", "t", "--timeout", "0"),
    ("submit", "t", "--wait-timeout", "nan"),
    ("submit", "t", "--priority", "99999999999"),
    ("submit", "t", "--max-attempts", "-1"),
    ("schedules", "create", "n", "* * * * *", "t", "--start", "9999-12-31T23:59:59Z"),
    ("schedules", "create", "n", "* * * * *", "t", "--end", "0001-01-01T00:00:00Z"),
    ("schedules", "create", "n", "* * * * *", "t", "--timeout", "nan"),
    ("schedules", "create", "n", "* * * * *", "t", "--catch-up-limit", "99999999999"),
    ("schedules", "create", "n", "* * * * *", "t", "--priority", "-99999999999"),
    ("top", "--interval", "nan"),
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
async def test_a_flag_at_the_edge_of_its_type_is_one_line_naming_it(args: tuple[str, ...]) -> None:
    done = await conveyor(*args, *NOWHERE)
    assert done.code == 2, done
    line = done.err.strip()
    assert done.err.count("\n") == 1 and "Traceback" not in done.err, done.err
    flag = next(a for a in args if a.startswith("--"))
    assert f"'{flag}'" in line and "must be between" in line, line


async def test_the_global_rpc_timeout_has_a_range() -> None:
    done = await conveyor("--rpc-timeout", "1e300", "get", "x", "--coordinator", "127.0.0.1:1")
    assert done.code == 2 and "'--rpc-timeout'" in done.err, done


# Issue 20, break 8: `--delay 1h` failed ("unable to parse string as a number") while
# `keys create --expires-in 90d` worked. Every duration flag takes the same syntax; one
# that parses goes on to connect (exit code 1 here), one that does not is a usage error.
DURATIONS = [
    ("submit", "t", "--delay", "1h", "--timeout", "1m30s", "--wait-timeout", "500ms"),
    ("schedules", "create", "n", "* * * * *", "t", "--timeout", "2m"),
    ("keys", "create", "--tenant", "a", "--scope", "read", "--expires-in", "1h30m"),
]


@pytest.mark.parametrize("args", DURATIONS, ids=[" ".join(c) for c in DURATIONS])
async def test_every_duration_flag_takes_units(args: tuple[str, ...]) -> None:
    done = await conveyor(*args, *NOWHERE)
    assert done.code == 1 and "cannot reach the coordinator" in done.err, done


async def test_a_duration_flag_names_the_syntax() -> None:
    done = await conveyor("submit", "t", "--delay", "1h30", *NOWHERE)
    assert done.code == 2 and "'--delay'" in done.err and "1h30m" in done.err, done
