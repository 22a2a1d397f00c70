"""The audit log's hash chain, pure: how a row is hashed, and how a chain is verified.

Row ``seq`` (from 1, no gaps) stores ``prev_hash``, the hash of row ``seq - 1`` (32 zero
bytes for row 1), and ``hash = SHA-256(prev_hash || encode(row))``, where ``encode`` is
the compact JSON array of a format version and the row's fields (:func:`encode`, time in
integer microseconds since the epoch). So:

- a row edited without recomputing its hash no longer matches it;
- a row edited with its hash recomputed no longer matches the next row's ``prev_hash``;
- a deleted row leaves a gap in ``seq`` (renumbering the rows after it changes what each
  of them hashes);
- only the newest rows can be cut off without a trace in the chain itself: compare the
  head (``seq`` and hash) that :func:`verify` reports with one recorded earlier.

:func:`verify` walks rows in ``seq`` order, in one pass, and names every row it finds
wrong. ``conveyor audit verify`` runs it on the rows it reads, so the check does not
depend on trusting the coordinator's own hashes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

GENESIS = bytes(32)
"""The prev_hash of row 1."""
FORMAT_VERSION = 1
MAX_FIELD_LENGTH = 512
"""Longest text kept per field (a target or detail from a request is cut there)."""

_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def clean(text: str) -> str:
    """``text`` as an audit field: control characters (NUL included, which PostgreSQL
    refuses) escaped, cut to MAX_FIELD_LENGTH. Requests are audited before or without
    validation, so their fields can hold anything."""
    if _UNSTORABLE.search(text):
        text = _UNSTORABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text[:MAX_FIELD_LENGTH]


@dataclass(frozen=True, slots=True)
class Event:
    """One audit event, before it has a place in the chain."""

    time: datetime
    tenant: str
    key_id: str
    action: str
    target: str = ""
    outcome: str = "OK"
    peer: str = ""
    request_id: str = ""
    detail: str = ""

    @staticmethod
    def make(
        *,
        tenant: str,
        key_id: str,
        action: str,
        target: str = "",
        outcome: str = "OK",
        peer: str = "",
        request_id: str = "",
        detail: str = "",
        time: datetime | None = None,
    ) -> Event:
        """An event stamped now (or at ``time``, UTC), its text fields cleaned."""
        return Event(
            time=time or datetime.now(UTC),
            tenant=clean(tenant),
            key_id=clean(key_id),
            action=clean(action),
            target=clean(target),
            outcome=clean(outcome),
            peer=clean(peer),
            request_id=clean(request_id),
            detail=clean(detail),
        )


@dataclass(frozen=True, slots=True)
class Row:
    """A stored row of the chain."""

    seq: int
    event: Event
    prev_hash: bytes
    hash: bytes


def micros(when: datetime) -> int:
    """Microseconds since the epoch: the time as it is hashed (exact, unlike a float)."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode(seq: int, event: Event) -> bytes:
    """The bytes a row's hash covers (besides prev_hash)."""
    e = event
    fields = [FORMAT_VERSION, seq, micros(e.time), e.tenant, e.key_id, e.action, e.target,
              e.outcome, e.peer, e.request_id, e.detail]  # fmt: skip
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def row_hash(prev_hash: bytes, seq: int, event: Event) -> bytes:
    return hashlib.sha256(prev_hash + encode(seq, event)).digest()


def chain(head_seq: int, head_hash: bytes, events: Iterable[Event]) -> list[Row]:
    """The rows that append ``events`` after the row ``head_seq`` (0: an empty log)."""
    rows: list[Row] = []
    seq, prev = head_seq, head_hash
    for event in events:
        seq += 1
        digest = row_hash(prev, seq, event)
        rows.append(Row(seq, event, prev, digest))
        prev = digest
    return rows


@dataclass
class Verification:
    """What :func:`verify` found."""

    rows: int = 0
    head_seq: int = 0
    head_hash: bytes = GENESIS
    problems: list[tuple[int, str]] = field(default_factory=list)
    """(seq, what is wrong there), in chain order."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rows: Iterable[Row], *, max_problems: int = 100) -> Verification:
    """Checks a whole chain, rows in ascending ``seq`` order (see the module docstring)."""
    out = Verification()
    expected_seq, expected_prev = 1, GENESIS
    for row in rows:
        out.rows += 1
        if row.seq > expected_seq:
            missing = (
                f"row {expected_seq} is missing"
                if row.seq == expected_seq + 1
                else f"rows {expected_seq} to {row.seq - 1} are missing"
            )
            out.problems.append((expected_seq, f"{missing} (deleted)"))
        elif row.seq < expected_seq:
            out.problems.append((row.seq, f"row {row.seq} appears twice or out of order"))
        elif row.prev_hash != expected_prev:
            out.problems.append(
                (
                    row.seq,
                    f"row {row.seq} does not follow row {row.seq - 1}: row {row.seq - 1} was "
                    "edited (and its hash recomputed) or replaced",
                )
            )
        if row_hash(row.prev_hash, row.seq, row.event) != row.hash:
            out.problems.append(
                (row.seq, f"row {row.seq} was edited: its contents do not match its hash")
            )
        expected_seq, expected_prev = max(expected_seq, row.seq + 1), row.hash
        out.head_seq, out.head_hash = row.seq, row.hash
        if len(out.problems) >= max_problems:
            break
    return out
