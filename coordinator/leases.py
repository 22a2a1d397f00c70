"""Leases, coordinator side: one type and one key from the wire to the database and back.

A lease names one attempt of a task held by one worker. Its key is
``(tenant, task id, attempt, epoch, worker id)``: the task id, attempt and epoch come from
the wire (``conveyor.v1.Lease``), the tenant and worker id from the session that sends it,
so a worker can only ever name its own leases. Claims and hand-offs make keys, results,
renewals, cancels and releases match by the whole key (``store/tasks.py``), and the store
returns the keys it matched: a stale result flushed beside the current attempt's result
is refused and recorded, never taken for it.

Task ids stay canonical lowercase text end to end (asyncpg encodes text to uuid): parsing
a UUID object per result is measurable at 10,000 results a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from conveyor.v1 import worker_service_pb2

PROTOCOL_VERSION = 1
"""The worker protocol version this coordinator speaks (``Hello.protocol_version``)."""
RESUME_TOKEN_BYTES = 32
"""The length of a worker process's resume token (``Welcome.resume_token``)."""

FIRST_ATTEMPT = 1
"""The attempt number of a task's first lease (``attempt`` counts leases, from 1)."""

# Why a lease was refused, as a worker reads it in ResultAck.reason.
REFUSED_NOT_CURRENT = "lease is not current: the task finished, was cancelled or was leased again"
REFUSED_MALFORMED = "malformed task id"
REFUSED_UNKNOWN_OUTCOME = "unknown outcome"

_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class LeaseKey(NamedTuple):
    """One attempt of one task, held by one worker: the key everything matches by."""

    tenant: str
    task_id: str
    """Canonical lowercase text."""
    attempt: int
    epoch: int
    worker_id: str


# The key's fields as store array parameters, in LeaseKey order.
KEY_ARRAYS: tuple[tuple[str, str], ...] = (
    ("tenant", "text"),
    ("id", "uuid"),
    ("attempt", "int"),
    ("epoch", "bigint"),
    ("worker_id", "text"),
)


def parse(tenant: str, worker_id: str, lease: worker_service_pb2.Lease) -> LeaseKey | None:
    """The key a worker's lease names; None when the task id is malformed."""
    task_id = lease.task_id.lower()
    if not _TASK_ID.fullmatch(task_id):
        return None
    return LeaseKey(tenant, task_id, lease.attempt, lease.epoch, worker_id)


def lease_proto(task_id: str, attempt: int, epoch: int) -> worker_service_pb2.Lease:
    """The wire form of a lease (the one place a Lease message is made)."""
    return worker_service_pb2.Lease(task_id=task_id, attempt=attempt, epoch=epoch)


def to_proto(key: LeaseKey) -> worker_service_pb2.Lease:
    return lease_proto(key.task_id, key.attempt, key.epoch)


def from_row(row: Any) -> LeaseKey:
    """The key of a store row with tenant, id, attempt, lease_epoch and worker_id."""
    return LeaseKey(
        row["tenant"], str(row["id"]), row["attempt"], row["lease_epoch"], row["worker_id"]
    )


def key_arrays(keys: Sequence[LeaseKey]) -> dict[str, Any]:
    """The keys as the array parameters named in :data:`KEY_ARRAYS`."""
    if not keys:
        return {name: [] for name, _ in KEY_ARRAYS}
    columns = zip(*keys, strict=True)
    return {name: list(values) for (name, _), values in zip(KEY_ARRAYS, columns, strict=True)}


KeyTuple = tuple[str, str, int, int, str]
"""A key as a plain tuple: equal to (and hashed like) the LeaseKey with the same fields."""


def keys_of(rows: Iterable[Any]) -> set[KeyTuple]:
    """The keys of store rows, for membership tests (plain tuples: a quarter of the cost
    of building LeaseKeys, per row of every batch)."""
    return {
        (r["tenant"], str(r["id"]), r["attempt"], r["lease_epoch"], r["worker_id"]) for r in rows
    }
