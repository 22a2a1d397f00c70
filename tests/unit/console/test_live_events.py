"""Server-sent events: no content can make a line of its own (pure)."""

from __future__ import annotations

import pytest

from conveyor.console.live import event


@pytest.mark.parametrize(
    "data",
    ["<p>one</p>", "a\nb", "a\r\nb", "a\rb", "x\revent: forged\ndata: <script>", "\u2028\x85", ""],
)
def test_every_line_of_the_data_is_a_data_field(data: str) -> None:
    frame = event("task", data).decode()
    assert frame.endswith("\n\n")
    # As a browser splits an event stream into lines: CR, LF or CRLF.
    lines = frame[:-2].replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert lines[0] == "event: task"
    assert all(line.startswith("data: ") for line in lines[1:]), lines
