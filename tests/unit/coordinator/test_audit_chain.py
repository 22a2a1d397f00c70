"""The audit log's hash chain, pure (coordinator/audit_chain.py): verify finds every kind
of tampering and says which row."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

from conveyor.coordinator.audit.chain import (
    GENESIS,
    MAX_FIELD_LENGTH,
    Event,
    Row,
    chain,
    clean,
    encode,
    row_hash,
    verify,
)

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _events(count: int) -> list[Event]:
    return [
        Event.make(
            tenant="acme",
            key_id="k1",
            action="CancelTask",
            target=f"task-{i}",
            peer="ipv4:10.0.0.1:5000",
            request_id=f"r{i}",
            time=START + timedelta(microseconds=i),
        )
        for i in range(count)
    ]


def test_a_whole_chain_verifies_and_reports_its_head() -> None:
    rows = chain(0, GENESIS, _events(5))
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    result = verify(rows)
    assert result.ok and result.rows == 5
    assert (result.head_seq, result.head_hash) == (5, rows[-1].hash)
    # Appending continues the same chain.
    more = chain(5, rows[-1].hash, _events(2))
    assert verify(rows + more).ok


def test_an_empty_log_verifies() -> None:
    result = verify([])
    assert result.ok and (result.rows, result.head_seq, result.head_hash) == (0, 0, GENESIS)


def test_a_deleted_row_is_named() -> None:
    rows = chain(0, GENESIS, _events(6))
    result = verify(rows[:2] + rows[3:])
    assert [seq for seq, _ in result.problems] == [3]
    assert "row 3 is missing (deleted)" in result.problems[0][1]
    result = verify(rows[:1] + rows[4:])
    assert result.problems == [(2, "rows 2 to 4 are missing (deleted)")]
    # The first rows too.
    assert verify(rows[2:]).problems == [(1, "rows 1 to 2 are missing (deleted)")]


def test_an_edited_row_is_named() -> None:
    rows = chain(0, GENESIS, _events(4))
    edited = dataclasses.replace(rows[1].event, outcome="OK", target="someone-else")
    tampered = [rows[0], dataclasses.replace(rows[1], event=edited), *rows[2:]]
    result = verify(tampered)
    assert result.problems == [(2, "row 2 was edited: its contents do not match its hash")]


def test_an_edit_with_its_hash_recomputed_is_caught_at_the_next_row() -> None:
    rows = chain(0, GENESIS, _events(4))
    edited = dataclasses.replace(rows[1].event, key_id="k2")
    forged = Row(2, edited, rows[1].prev_hash, row_hash(rows[1].prev_hash, 2, edited))
    result = verify([rows[0], forged, *rows[2:]])
    assert [seq for seq, _ in result.problems] == [3]
    assert "row 2 was edited" in result.problems[0][1]


def test_renumbering_after_a_deletion_breaks_every_hash_after_it() -> None:
    rows = chain(0, GENESIS, _events(4))
    renumbered = [rows[0], dataclasses.replace(rows[2], seq=2), dataclasses.replace(rows[3], seq=3)]
    result = verify(renumbered)
    assert not result.ok
    assert {seq for seq, _ in result.problems} >= {2, 3}


def test_every_field_is_covered_by_the_hash() -> None:
    (event,) = _events(1)
    base = encode(1, event)
    for field in dataclasses.fields(Event):
        value = getattr(event, field.name)
        changed = value + timedelta(microseconds=1) if field.name == "time" else value + "x"
        assert encode(1, dataclasses.replace(event, **{field.name: changed})) != base
    assert encode(2, event) != base


def test_fields_are_made_storable() -> None:
    assert clean("a\x00b\nc") == "a\\x00b\\x0ac"
    assert len(clean("x" * 10_000)) == MAX_FIELD_LENGTH
    event = Event.make(tenant="t", key_id="", action="CancelTask", target="id\x00")
    assert "\x00" not in event.target
