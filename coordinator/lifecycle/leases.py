"""Leases, coordinator side: the one key, renewals, and every way a lease is given back.

A lease names one attempt of a task held by one worker. Its key (:class:`LeaseKey`) is
``(tenant, task id, attempt, epoch, worker id)``: the task id, attempt and epoch come from
the wire (``conveyor.v1.Lease``), the tenant and worker id from the session that sends it,
so a worker can only ever name its own leases. ``epoch`` is the leader's epoch that
granted the lease (the fencing token; the ``lease_epoch`` column). Results, renewals,
cancels and releases match by the whole key (``store/tasks.py``), and the store says
which entries it matched: a stale result flushed beside the current attempt's result is
refused and recorded, never taken for it.

A lease begins in one place, dispatch (``dispatch/dispatcher.py``: a claim, or the
hand-off of a fresh submit), and ends as a transition (``transitions.py``): a result
(``results.py``), or here, where :class:`Leases` owns what else happens to one while it
is held:

- renewals: every heartbeat renews the leases it lists, group-committed;
- a reconnect resumes the leases the worker lists in ``Hello.in_flight`` and takes back,
  without using an attempt, any other it held (it never received those);
- leases queued for a worker whose stream ended before they were written go back at
  once, not counted (:data:`UNDELIVERED`);
- an evicted worker's leases are taken back at once, counted (they may have run).
  Expired leases are the reaper's (``leader/maintenance.py``).

Task ids stay canonical lowercase text end to end (asyncpg encodes text to uuid): parsing
a UUID object per result is measurable at 10,000 results a second.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.lifecycle.batcher import Batcher
from conveyor.coordinator.lifecycle.transitions import Cause
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.tasks import Release
from conveyor.v1 import worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.leases")

# Why a lease was refused, as a worker reads it in ResultAck.reason.
REFUSED_NOT_CURRENT = "lease is not current: the task finished, was cancelled or was leased again"
REFUSED_MALFORMED = "malformed task id"
REFUSED_UNKNOWN_OUTCOME = "unknown outcome"

_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

UNDELIVERED = Release(
    store.OUTCOME_NOT_STARTED,
    False,
    "never started: the stream to worker %s ended before the task was sent",
)


class LeaseKey(NamedTuple):
    """One attempt of one task, held by one worker: the key everything matches by."""

    tenant: str
    task_id: str
    """Canonical lowercase text."""
    attempt: int
    epoch: int
    worker_id: str


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


@dataclass
class Mapped:
    """One Results or Heartbeat message, checked: what goes to the store and what not.

    ``stored`` holds the positions (in the message) of the entries sent to the store,
    whose answers come back in that order; ``refused`` the others, with the reason.
    """

    size: int
    stored: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    def answers(self, stored_answers: Sequence[bool]) -> list[tuple[bool, str]]:
        """(accepted, reason) for every entry of the message, in order."""
        out: list[tuple[bool, str]] = [(False, "")] * self.size
        for index, reason in self.refused.items():
            out[index] = (False, reason)
        for index, ok in zip(self.stored, stored_answers, strict=True):
            out[index] = (ok, "" if ok else REFUSED_NOT_CURRENT)
        return out


def map_leases(
    tenant: str, worker_id: str, wire: Sequence[worker_service_pb2.Lease]
) -> tuple[Mapped, list[LeaseKey]]:
    """Checks one Heartbeat's leases; returns the mapping and the keys to renew."""
    mapped = Mapped(len(wire))
    keys: list[LeaseKey] = []
    for index, lease in enumerate(wire):
        key = parse(tenant, worker_id, lease)
        if key is None:
            mapped.refused[index] = REFUSED_MALFORMED
        else:
            mapped.stored.append(index)
            keys.append(key)
    return mapped, keys


class Leases:
    """Renewals and the releases of leases held (see the module docstring).

    The renewal batcher runs with the process, not the term: a follower's renewals are
    refused by the fence like any dispatch-side write.
    """

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        cfg = deps.config
        # One item per heartbeat (a list of leases), so a message costs one future.
        self.renewals: Batcher[Sequence[LeaseKey], list[bool]] = Batcher(
            "renewal",
            self._flush_renewals,
            max_batch=cfg.max_batch,
            max_pending=cfg.max_pending_operations,
            on_flush=deps.metrics.record_flush,
        )

    def start(self) -> None:
        self.renewals.start()

    async def stop(self) -> None:
        await self.renewals.stop()

    async def _flush_renewals(self, messages: Sequence[Sequence[LeaseKey]]) -> list[list[bool]]:
        deps = self._deps
        keys = [k for message in messages for k in message]
        async with deps.db.autocommit() as conn:
            renewed = await store.renew_leases(
                conn, keys, deps.config.lease_duration, deps.office.fence()
            )
        deps.metrics.record_refused(len(keys) - len(renewed))
        answers = iter(i in renewed for i in range(len(keys)))
        return [[next(answers) for _ in message] for message in messages]

    async def resume(
        self, tenant: str, worker_id: str, in_flight: Sequence[worker_service_pb2.Lease]
    ) -> list[worker_service_pb2.Lease]:
        """A worker (re)connects: keeps the leases it lists that are still current, takes
        back every other it held (never received: not counted). Returns those it lost."""
        keys: list[LeaseKey] = []
        lost: list[worker_service_pb2.Lease] = []
        for lease in in_flight:
            key = parse(tenant, worker_id, lease)
            if key is None:
                lost.append(lease)
            else:
                keys.append(key)
        deps = self._deps
        fence = deps.office.fence()
        async with deps.db.write(fence) as conn:
            renewed = (
                await store.renew_leases(conn, keys, deps.config.lease_duration, fence)
                if keys
                else set()
            )
            kept = [k for i, k in enumerate(keys) if i in renewed]
            released = await store.release_abandoned(conn, tenant, worker_id, kept, fence)
        lost.extend(to_proto(k) for i, k in enumerate(keys) if i not in renewed)
        if released:
            _log.info("took back %d tasks worker %s never received", len(released), worker_id)
            deps.after_commit.publish(Cause.NOT_STARTED, released)
        return lost

    async def release_undelivered(self, conn: asyncpg.Connection, keys: list[LeaseKey]) -> None:
        """Puts leases that never reached their worker back to PENDING, not counted."""
        deps = self._deps
        released = await store.release_leases(conn, keys, UNDELIVERED, deps.office.fence())
        if released:
            _log.info("took back %d tasks that never reached their worker", len(released))
            deps.after_commit.publish(Cause.NOT_STARTED, released)

    async def release_evicted(
        self, conn: asyncpg.Connection, tenant: str, worker_id: str, reason: str
    ) -> int:
        """Takes back every lease of an evicted worker, counted (they may have run);
        returns how many."""
        how = Release(
            store.OUTCOME_LEASE_EXPIRED, True, f"worker %s was evicted: {reason.replace('%', '%%')}"
        )
        deps = self._deps
        released = await store.release_worker(conn, tenant, worker_id, how, deps.office.fence())
        deps.after_commit.publish(Cause.EVICTED, released)
        return len(released)
