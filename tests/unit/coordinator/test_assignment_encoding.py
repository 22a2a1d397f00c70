"""Assignments encoded from shared parts (``convert.assignments_from_rows``) are exactly the
messages built field by field (``convert.add_assignment_from_row``), for every kind of
claimed row, and a row that cannot be carried fails as it did."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.coordinator import convert
from conveyor.coordinator.dispatch.policy import DispatchPolicy, assignments_message
from conveyor.v1 import worker_service_pb2

NOW = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


def _row(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "attempt": 1,
        "epoch": 3,
        "queue": "q",
        "type": "a",
        "payload": b"x",
        "content_type": "application/json",
        "max_attempts": 3,
        "idempotency_key": None,
        "timeout_ms": 300_000,
        "labels": "{}",
        "traceparent": "",
        "create_time": NOW,
    }
    row.update(fields)
    return row


def _rows() -> list[dict[str, Any]]:
    return [
        _row(),
        _row(),  # the same shape: shares the encoding
        _row(id=str(uuid.uuid4())),  # text ids, as tests and the hand-off give them
        _row(payload=b""),
        _row(payload=b"p" * 200),  # lengths past one varint byte
        _row(payload=bytes(range(256)) * 70_000),  # past three
        _row(attempt=0, epoch=0),
        _row(attempt=None, epoch=None, traceparent=None, payload=None),  # NULLs: left unset
        _row(attempt=200, epoch=1 << 40),
        _row(attempt=-1, epoch=-5),  # written by hand: ten-byte varints
        _row(attempt=2**31 - 1, epoch=2**63 - 1),
        _row(idempotency_key=""),
        _row(idempotency_key="key-1"),
        _row(idempotency_key="é" * 300),
        _row(labels=None),
        _row(labels='{"k": "v", "é": "ü"}'),  # built as a message
        _row(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        _row(create_time=None),
        _row(create_time=NOW + timedelta(microseconds=1)),
        _row(create_time=datetime(1970, 1, 1, tzinfo=UTC)),  # a Timestamp of zeros
        _row(timeout_ms=0),  # a Duration of zeros, still sent
        _row(timeout_ms=1_500),
        _row(max_attempts=0),
        _row(content_type="", queue="", type=""),
        _row(queue="q" * 128, type="t" * 128),
    ]


def _built(rows: list[dict[str, Any]]) -> worker_service_pb2.ConnectResponse:
    return assignments_message(convert.add_assignment_from_row, rows)


def test_encoded_assignments_are_the_built_messages() -> None:
    rows = _rows()
    encoded = convert.assignments_from_rows(rows)
    built = _built(rows)
    assert encoded == built
    # Deterministic: a map (labels) is serialized in its hash table's order otherwise, which
    # two equal messages need not share (the bytes differed in 2 runs of 30).
    assert encoded.SerializeToString(deterministic=True) == built.SerializeToString(
        deterministic=True
    )
    for row in rows:  # and each alone
        assert convert.assignments_from_rows([row]) == _built([row])


@pytest.mark.parametrize(
    "bad",
    [
        {"create_time": datetime.max},  # infinity, read back naive
        {"labels": "[1, 2]"},  # no string map
        {"max_attempts": 2**31},  # past int32
        {"idempotency_key": "\ud800"},  # no UTF-8
    ],
)
def test_a_row_no_assignment_can_carry_fails_alone(bad: dict[str, Any]) -> None:
    with pytest.raises(Exception):  # noqa: B017 (whatever protobuf raises)
        _built([_row(**bad)])
    rows = [_row(), _row(**bad), _row()]
    with pytest.raises(Exception):  # noqa: B017
        convert.assignments_from_rows(rows)
    assert list(DispatchPolicy.unusable(rows)) == [1]
