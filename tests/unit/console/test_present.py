"""How the console shows values: payloads, errors, times (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.console.present import (
    SHOWN_BYTES,
    ScheduleTick,
    ago,
    duration,
    error_view,
    made_by_schedule,
    payload_view,
    stamp,
    tally,
)
from conveyor.transport._encryption import Binding, EncryptionCodec, KeyRing

MARKUP = "<img src=x onerror=alert(1)>"


def test_json_is_pretty_printed_and_markup_stays_text() -> None:
    data = json.dumps({"html": MARKUP, "n": [1, 2]}).encode()
    view = payload_view(data, "application/json")
    assert view.kind == "json"
    assert (
        view.text == '{\n  "html": "<img src=x onerror=alert(1)>",\n  "n": [\n    1,\n    2\n  ]\n}'
    )
    assert view.note == f"{len(data)} bytes, application/json"
    assert payload_view(b'{"a": 1}', "application/problem+json").kind == "json"


def test_json_that_does_not_parse_is_shown_as_text() -> None:
    view = payload_view(b"{not json", "application/json")
    assert (view.kind, view.text) == ("text", "{not json")


def test_text_binary_empty_and_cut() -> None:
    assert payload_view("héllo".encode(), "text/plain").text == "héllo"
    binary = payload_view(bytes(range(40)), "application/octet-stream")
    assert binary.kind == "binary"
    assert (
        binary.text.splitlines()[0] == "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
    )
    assert payload_view(b"", "application/json").kind == "empty"
    big = ("é" * SHOWN_BYTES).encode()  # cut in the middle of a character: still text
    view = payload_view(big, "application/json")
    assert view.kind == "text" and len(view.text.encode()) <= SHOWN_BYTES
    assert f"the first {SHOWN_BYTES:,} shown" in view.note


def test_an_encrypted_payload_says_so_and_shows_nothing() -> None:
    codec = EncryptionCodec(KeyRing.generate("k1"))
    sealed, content_type = codec.encode(
        b'{"card": "4242"}', "application/json", Binding.payload("charge", task_id="t1")
    )
    view = payload_view(sealed, content_type)
    assert view.kind == "encrypted" and view.text == ""
    assert "encrypted end to end with key 'k1'" in view.note


def test_an_error_splits_into_its_line_and_its_traceback() -> None:
    text = 'ValueError: bad card\n\nTraceback (most recent call last):\n  File "x.py", line 1'
    view = error_view(text)
    assert view is not None
    assert view.summary == view.fingerprint == "ValueError: bad card"
    assert view.detail.startswith("Traceback (most recent call last):")
    assert error_view("") is None and error_view(None) is None
    assert error_view("timed out").detail == ""  # type: ignore[union-attr]


def test_a_fired_task_names_its_schedule() -> None:
    key = "schedule:0190a4c6-0000-7000-8000-000000000001:2025-03-01T03:00:00Z"
    assert made_by_schedule(key) == ScheduleTick(
        "0190a4c6-0000-7000-8000-000000000001", "2025-03-01T03:00:00Z"
    )
    assert made_by_schedule("order-17") is None
    assert made_by_schedule(None) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250 ms"), (3.21, "3.2 s"), (60, "1 min"), (250, "4 min 10 s"),
     (7500, "2 h 5 min"), (90000, "1 d 1 h"), (-1, "-")],
)  # fmt: skip
def test_durations(seconds: float, text: str) -> None:
    assert duration(timedelta(seconds=seconds)) == text


def test_times() -> None:
    when = datetime(2025, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)
    assert stamp(when) == "2025-03-01 12:30:15Z"
    assert stamp(None) == "-"
    assert ago(when, when + timedelta(seconds=5)) == "5.0 s"
    assert ago(when + timedelta(seconds=5), when) == "0 ms"  # a clock a little ahead


def test_a_capped_count_reads_as_at_least() -> None:
    assert tally(1234) == "1,234"
    assert tally(10_000, capped=True) == "10,000+"
    assert tally(0, capped=False) == "0"
