"""Pending results: kept until the coordinator acknowledges them, resent after a reconnect.

(The coordinator's "outbox" is something else: a session's queue of messages to its
worker. What a worker SDK keeps here are results it owes, not messages.)"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from conveyor.v1 import worker_service_pb2 as pb

__all__ = ["MAX_RESULT_BYTES", "AttemptKey", "PendingResults", "Success", "attempt_key"]

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


def _lease(key: AttemptKey, epoch: int) -> pb.Lease:
    return pb.Lease(task_id=key[0], attempt=key[1], epoch=epoch)


#: A success as it waits: the lease's epoch and the result bytes (its task id and
#: attempt are the key it is filed under). A message per success, built when the
#: attempt ended and copied into each Results message that carried it, was a fifth of
#: the CPU a no-op task costs the worker loop (issue 19); the message is built once,
#: in place, when it is sent. Every other outcome waits as its TaskResult.
Success = tuple[int, bytes]


class PendingResults:
    """Results in the order produced, each kept until a ResultAck (accepted or not).

    "Unsent" are the results not yet written on the current session: all of them again
    after a reconnect (:meth:`resend_all`), since the old stream may have lost any.
    """

    def __init__(self) -> None:
        self._results: dict[AttemptKey, pb.TaskResult | Success] = {}
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
        if len(result.result) > MAX_RESULT_BYTES:
            result = self._too_large(key, result.lease.epoch, len(result.result))
        self._keep(key, result)

    def add_success(self, key: AttemptKey, epoch: int, data: bytes) -> None:
        """Keep the success of attempt ``key`` of lease epoch ``epoch``, which returned
        ``data`` (a failure instead if it is too large to send): :meth:`add` of a
        SUCCEEDED TaskResult, without making the message until it is sent."""
        if len(data) > MAX_RESULT_BYTES:
            self._keep(key, self._too_large(key, epoch, len(data)))
        else:
            self._keep(key, (epoch, data))

    def _keep(self, key: AttemptKey, result: pb.TaskResult | Success) -> None:
        results = self._results
        if not results:
            self._settled.clear()  # the first one waiting (a call per result otherwise)
        results[key] = result
        self._unsent[key] = None

    @staticmethod
    def _too_large(key: AttemptKey, epoch: int, size: int) -> pb.TaskResult:
        error = (
            f"the handler's result is too large ({size} bytes; the limit is "
            f"{MAX_RESULT_BYTES}): store large outputs elsewhere and return a reference"
        )
        logger.error("task %s attempt %d: %s", *key, error)
        return pb.TaskResult(
            lease=_lease(key, epoch),
            outcome=pb.TASK_OUTCOME_FAILED,
            error=error,
            retryable=False,
        )

    def cancelled(self, key: AttemptKey) -> None:
        """The coordinator cancelled this attempt: a refusal of its result is expected."""
        # Only results still waiting for their ack: the set never outgrows them.
        if key in self._results:
            self._cancelled.add(key)

    def ack_all(self, acks: Iterable[pb.ResultAck]) -> None:
        """Drops the results a ResultAcks message acknowledges, in one call (a call or two
        per ack were 7.6 % of a worker's loop in the benchmark; issue 19); a refusal is
        worth a warning unless expected."""
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
                outcome = pb.TASK_OUTCOME_SUCCEEDED if isinstance(result, tuple) else result.outcome
                self._refused(key, outcome, ack.reason, was_cancelled)
        if not results:
            self._settled.set()

    def ack_message(self, keys: Iterable[AttemptKey], refused: Iterable[pb.ResultAck]) -> None:
        """Drops the results of one Results message answered as a whole (a ResultAcks
        with its sequence): ``keys`` are the attempts it carried, ``refused`` the acks of
        those the coordinator refused; every other one was accepted. Nothing to read
        per accepted result (:meth:`ack_all` reads an ack, its lease and two strings
        each; issue 19)."""
        self.ack_all(refused)
        results, unsent, cancelled = self._results, self._unsent, self._cancelled
        pop = results.pop
        for key in keys:
            if pop(key, None) is None:
                continue  # refused above, or answered already
            if unsent:
                unsent.pop(key, None)
            if cancelled:
                cancelled.discard(key)
        if not results:
            self._settled.set()

    @staticmethod
    def _refused(
        key: AttemptKey, outcome: pb.TaskOutcome.ValueType, reason: str, cancelled: bool
    ) -> None:
        if cancelled or outcome == pb.TASK_OUTCOME_CANCELLED:
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
        return {
            key: _lease(key, result[0]) if isinstance(result, tuple) else result.lease
            for key, result in self._results.items()
        }

    def resend_all(self) -> None:
        """Mark every kept result as unsent (a new session starts)."""
        self._unsent = collections.OrderedDict.fromkeys(self._results)

    def unsent_count(self) -> int:
        """Results not yet written on the current session."""
        return len(self._unsent)

    def take_batch(
        self,
        into: RepeatedCompositeFieldContainer[pb.TaskResult],
        limit: int,
        max_bytes: int,
        overhead: int,
        keys: list[AttemptKey] | None = None,
    ) -> int:
        """Appends to ``into`` (a Results message's ``results``) up to ``limit`` unsent
        results weighing up to ``max_bytes`` (a result's result and error bytes plus
        ``overhead``; the first one goes whatever it weighs), in one pass; they stay kept
        until acked. Returns how many it appended; their keys, in order, are appended to
        ``keys`` when given (for :meth:`ack_message`)."""
        unsent = self._unsent
        results = self._results
        add = into.add
        taken = size = 0
        succeeded = pb.TASK_OUTCOME_SUCCEEDED
        while unsent and taken < limit:
            key = next(iter(unsent))
            result = results[key]
            if isinstance(result, tuple):
                epoch, data = result
                size += len(data) + overhead
                if taken and size > max_bytes:
                    break
                message = add()
                lease = message.lease
                lease.task_id, lease.attempt = key
                lease.epoch = epoch
                message.outcome = succeeded
                if data:
                    message.result = data
            else:
                size += len(result.result) + len(result.error) + overhead
                if taken and size > max_bytes:
                    break
                add().CopyFrom(result)
            del unsent[key]
            if keys is not None:
                keys.append(key)
            taken += 1
        return taken

    async def wait_settled(self) -> None:
        """Wait until every result was acknowledged."""
        await self._settled.wait()
