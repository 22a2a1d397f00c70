"""Pending results: kept until the coordinator acknowledges them, resent after a reconnect.

(The coordinator's "outbox" is something else: a session's queue of messages to its
worker. What a worker SDK keeps here are results it owes, not messages.)"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable

from conveyor.v1 import worker_service_pb2 as pb

__all__ = ["MAX_RESULT_BYTES", "AttemptKey", "PendingResults", "attempt_key"]

logger = logging.getLogger("conveyor.worker")

#: Identifies an attempt: (task_id, attempt). Not the coordinator's lease key: the epoch
#: is deliberately left out, so that an ack or cancel naming the attempt under a newer
#: leader epoch still finds it (a task never has two live attempts with the same number),
#: and the tenant and worker id are this worker's own.
AttemptKey = tuple[str, int]

#: Largest result the worker reports, in bytes. Results are stored with the task and
#: read back whole by every GetTask and WatchTask, so they are meant to be small (store
#: big outputs elsewhere and return a reference). A result too large for the stream would
#: break it, and resending it after the reconnect would break the next one too: such a
#: result fails its task (for good: running the handler again would produce it again)
#: instead of poisoning the batch it travels in.
MAX_RESULT_BYTES = 4 << 20


def attempt_key(lease: pb.Lease) -> AttemptKey:
    """The key an attempt is filed under."""
    return (lease.task_id, lease.attempt)


class PendingResults:
    """Results in the order produced, each kept until a ResultAck (accepted or not).

    "Unsent" are the results not yet written on the current session: all of them again
    after a reconnect (:meth:`resend_all`), since the old stream may have lost any.
    """

    def __init__(self) -> None:
        self._results: dict[AttemptKey, pb.TaskResult] = {}
        # An OrderedDict, not a dict: taking from the front of a plain dict over and over
        # rescans the deleted slots each time.
        self._unsent: collections.OrderedDict[AttemptKey, None] = collections.OrderedDict()
        self._settled = asyncio.Event()
        self._settled.set()
        # Results of attempts the coordinator cancelled: their refusal is expected.
        self._cancelled: set[AttemptKey] = set()

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, key: object) -> bool:
        return key in self._results

    def add(self, result: pb.TaskResult, key: AttemptKey | None = None) -> None:
        """Keep ``result`` (replacing it by a failure if it is too large to send);
        ``key``, when the caller has it, is its attempt's (saves reading the lease)."""
        if key is None:
            key = attempt_key(result.lease)
        size = len(result.result)
        if size > MAX_RESULT_BYTES:
            error = (
                f"the handler's result is too large ({size} bytes; the limit is "
                f"{MAX_RESULT_BYTES}): store large outputs elsewhere and return a reference"
            )
            logger.error("task %s attempt %d: %s", *key, error)
            result = pb.TaskResult(
                lease=result.lease, outcome=pb.TASK_OUTCOME_FAILED, error=error, retryable=False
            )
        self._results[key] = result
        self._unsent[key] = None
        self._settled.clear()

    def cancelled(self, key: AttemptKey) -> None:
        """The coordinator cancelled this attempt: a refusal of its result is expected."""
        # Only results still waiting for their ack: the set never outgrows them.
        if key in self._results:
            self._cancelled.add(key)

    def ack(self, ack: pb.ResultAck) -> None:
        """Drop the acknowledged result; a refusal is worth a warning unless expected."""
        self.ack_all((ack,))

    def ack_all(self, acks: Iterable[pb.ResultAck]) -> None:
        """:meth:`ack` for each of a ResultAcks message's acks, in one call (a call or
        two per ack: the acks were 7.6 % of a worker's loop in the benchmark; issue 19)."""
        results, unsent, cancelled = self._results, self._unsent, self._cancelled
        for ack in acks:
            lease = ack.lease
            key = (lease.task_id, lease.attempt)
            result = results.pop(key, None)
            was_cancelled = False
            if cancelled and key in cancelled:
                cancelled.discard(key)
                was_cancelled = True
            if result is None:
                logger.debug("ack for unknown result of task %s attempt %d", *key)
                continue
            unsent.pop(key, None)
            if not ack.accepted:
                self._refused(key, result, ack.reason, was_cancelled)
        if not results:
            self._settled.set()

    @staticmethod
    def _refused(key: AttemptKey, result: pb.TaskResult, reason: str, cancelled: bool) -> None:
        if cancelled or result.outcome == pb.TASK_OUTCOME_CANCELLED:
            # Cancelled on purpose (conveyor cancel): its result has no use, and the
            # coordinator's "lease is not current" would read like a fault.
            logger.info("task %s attempt %d was cancelled: its result is not kept", *key)
        else:
            logger.warning(
                "coordinator refused the result of task %s attempt %d: %s",
                *key,
                reason or "no reason given",
            )

    def leases(self) -> dict[AttemptKey, pb.Lease]:
        """The leases of the results waiting for an ack."""
        return {key: result.lease for key, result in self._results.items()}

    def resend_all(self) -> None:
        """Mark every kept result as unsent (a new session starts)."""
        self._unsent = collections.OrderedDict.fromkeys(self._results)

    def unsent_count(self) -> int:
        """Results not yet written on the current session."""
        return len(self._unsent)

    def peek_unsent(self) -> pb.TaskResult | None:
        """The next result to write, without taking it."""
        for key in self._unsent:
            return self._results[key]
        return None

    def take_batch(self, limit: int, max_bytes: int, overhead: int) -> list[pb.TaskResult]:
        """Up to ``limit`` unsent results weighing up to ``max_bytes`` (a result's result
        and error bytes plus ``overhead``; the first one goes whatever it weighs), in one
        pass; they stay kept until acked."""
        batch: list[pb.TaskResult] = []
        unsent = self._unsent
        results = self._results
        size = 0
        while unsent and len(batch) < limit:
            key = next(iter(unsent))
            result = results[key]
            size += len(result.result) + len(result.error) + overhead
            if batch and size > max_bytes:
                break
            del unsent[key]
            batch.append(result)
        return batch

    def take_unsent(self, limit: int) -> list[pb.TaskResult]:
        """Up to ``limit`` results to write now; they stay kept until acked."""
        batch: list[pb.TaskResult] = []
        while self._unsent and len(batch) < limit:
            key, _ = self._unsent.popitem(last=False)
            batch.append(self._results[key])
        return batch

    async def wait_settled(self) -> None:
        """Wait until every result was acknowledged."""
        await self._settled.wait()
