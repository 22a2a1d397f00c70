"""Task ids are UUIDv7 and strictly increasing within a process, within a millisecond too."""

from __future__ import annotations

import itertools

from conveyor.coordinator.ids import parse_task_id, uuid7


def test_ids_made_in_a_burst_are_strictly_increasing() -> None:
    # Thousands of ids per millisecond: random bits after the timestamp would order most
    # pairs of one millisecond wrongly (the defect this pins).
    ids = [uuid7() for _ in range(20_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len({i.int >> 80 for i in ids}) < len(ids), "expected ids sharing a millisecond"


def test_ids_are_version_7_rfc_9562() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == "specified in RFC 4122"
    assert parse_task_id(str(value)) == value


def test_parse_task_id_refuses_what_is_not_a_uuid() -> None:
    assert parse_task_id("not-a-uuid") is None
    assert parse_task_id("") is None
