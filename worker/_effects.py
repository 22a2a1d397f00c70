"""What handlers use to make their effects exactly once: the fencing token of an attempt,
the idempotency ledger (``ctx.ledger``) and named locks (``ctx.lock``).

Delivery is at least once: an attempt can do its effect and die before its result reaches
the coordinator, and the task runs again. The tools, from the simplest:

- :func:`fencing_token`: ``epoch << 32 | attempt``. A task's attempts count every lease,
  and a later lease is granted by a leader whose epoch is at least as large, so a later
  attempt of a task always has a larger token, across leader failover too. Pass it to
  what the handler writes; the destination refuses a token smaller than the largest it
  accepted for the task (``pg_ledger.check_fencing_token``).
- :class:`Ledger` (``ctx.ledger``, backed by the coordinator): ``record(key, result)``
  after the effect, ``get(key)`` before it. A record is refused once the attempt lost its
  lease (:class:`LeaseNotHeldError`). The gap it leaves: a crash *between* the effect and
  its record repeats the effect. Closing that gap needs the record and the effect in one
  transaction: ``conveyor.worker.pg_ledger`` does that in the handler's own PostgreSQL.
- :class:`~conveyor.client.Lock` (``ctx.lock(name, ttl)``): see ``client/_locks.py``.

The calls go over a client connection of the worker's own (the ``worker`` scope of its
key), opened on the first call and closed with the worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor.client._channel import Connection, RetryRules
from conveyor.client._locks import Lock
from conveyor.transport import ConnectionOptions
from conveyor.v1 import effects_service_pb2 as pb
from conveyor.v1 import worker_service_pb2

if TYPE_CHECKING:
    from conveyor.worker._context import TaskContext

__all__ = ["HandlerCalls", "Ledger", "LedgerEntry", "fencing_token"]

EPOCH_SHIFT = 32
"""The token's attempt part: attempts of one task stay far below 2**32."""

# Each ledger or lock call, failover and retries included.
CALL_TIMEOUT = 30.0


def fencing_token(epoch: int, attempt: int) -> int:
    """The fencing token of an attempt: ``epoch << 32 | attempt`` (see the module
    docstring). It fits PostgreSQL's bigint while epochs stay below 2**31."""
    return (epoch << EPOCH_SHIFT) | attempt


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """An effect recorded in the ledger.

    Attributes:
        key: The key it was recorded under.
        result: What the recording attempt passed to :meth:`Ledger.record` (JSON).
        attempt: The attempt that recorded it.
        fencing_token: That attempt's fencing token.
        create_time: When it was recorded (UTC).
    """

    key: str
    result: Any
    attempt: int
    fencing_token: int
    create_time: datetime


def _entry(message: pb.LedgerEntry) -> LedgerEntry:
    return LedgerEntry(
        key=message.key,
        result=json.loads(message.result) if message.result else None,
        attempt=message.attempt,
        fencing_token=message.fencing_token,
        create_time=message.create_time.ToDatetime(tzinfo=UTC),
    )


class HandlerCalls:
    """The coordinator calls of handlers (ledger, locks): a client connection of the
    worker's own, opened on first use."""

    def __init__(self, addresses: list[str], options: ConnectionOptions) -> None:
        self._addresses = addresses
        self._options = options
        self._connection: Connection | None = None
        self.resume_token = b""
        """The worker process's resume token (the runtime's): proves its leases."""

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(
                self._addresses, timeout=CALL_TIMEOUT, options=self._options, rules=RetryRules()
            )
        return self._connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


class Ledger:
    """The idempotency ledger of one attempt's task (``ctx.ledger``), for async handlers.

    Entries are scoped by tenant and task: every attempt of the task sees them, no other
    task does (a resubmit with the same idempotency key is the same task)::

        done = await ctx.ledger.get("charge")
        if done is None:
            receipt = await bank.charge(order, idempotency_key=ctx.task_id)
            await ctx.ledger.record("charge", receipt)
    """

    __slots__ = ("_calls", "_ctx")

    def __init__(self, ctx: TaskContext, calls: HandlerCalls) -> None:
        self._ctx = ctx
        self._calls = calls

    async def get(self, key: str) -> LedgerEntry | None:
        """The entry recorded under ``key`` for this task, by any attempt; None if none."""
        request = pb.GetEffectRequest(task_id=self._ctx.task_id, key=key)
        response = await self._calls.connection.unary(
            lambda s: s.ledger.GetEffect, request, idempotent=True
        )
        return _entry(response.entry) if response.HasField("entry") else None

    async def record(self, key: str, result: Any = None) -> LedgerEntry:
        """Records that the effect under ``key`` happened, with ``result`` (JSON-encodable,
        at most 64 KiB encoded). The first record of a key stands: a second returns the
        first's entry unchanged.

        Raises:
            LeaseNotHeldError: This attempt lost its lease (it expired and the task was
                leased again, or the task finished or was cancelled): a later attempt
                does the work, so stop without the effect's consequences.
        """
        ctx, calls = self._ctx, self._calls
        if not calls.resume_token:
            raise RuntimeError("the worker has no session yet: it cannot prove its lease")
        request = pb.RecordEffectRequest(
            lease=worker_service_pb2.Lease(
                task_id=ctx.task_id, attempt=ctx.attempt, epoch=ctx.epoch
            ),
            resume_token=calls.resume_token,
            key=key,
            result=json.dumps(result, separators=(",", ":")).encode(),
        )
        # Resending is safe: a second record by the same attempt returns the first.
        response = await calls.connection.unary(
            lambda s: s.ledger.RecordEffect, request, idempotent=True
        )
        return _entry(response.entry)


def lock(calls: HandlerCalls, name: str, ttl: float, timeout: float | None, renew: bool) -> Lock:
    """A :class:`~conveyor.client.Lock` over the handlers' connection."""
    return Lock(calls.connection, name, ttl, timeout=timeout, renew=renew)
