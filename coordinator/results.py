"""Workers' results and heartbeats: mapped from the wire, group-committed, matched by lease key.

A result applies only if its lease (``leases.LeaseKey``: tenant, task, attempt, epoch,
worker) is current; otherwise it is refused and recorded in ``refused_results``, never
applied, so a worker that lost its lease cannot overwrite a later attempt's outcome, even
when its stale result is flushed in the same statement as the current one.

What a worker sends is checked here, one result at a time, so nothing in one result can
fail another's batch: a malformed lease or an unknown outcome is refused alone; an error
text is made storable (NUL bytes escaped, long texts cut); a result larger than
``max_payload_bytes`` is stored as a non-retryable failure that says so, instead of being
refused over and over. KEY_UNAVAILABLE (the worker lacks the payload's encryption key) is
stored as an attempt that never started: the task is ready again at once, not counted,
and the stream stops giving that worker the key's tasks (``Mapped.missing_keys``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor.coordinator import leases
from conveyor.coordinator.batcher import Batcher
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.leases import LeaseKey
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.tasks import Outcome
from conveyor.v1 import worker_service_pb2

MAX_ERROR_CHARS = 10_000
_TRUNCATED = " ... (truncated)"

_OUTCOMES = {
    worker_service_pb2.TASK_OUTCOME_SUCCEEDED: store.OUTCOME_SUCCEEDED,
    worker_service_pb2.TASK_OUTCOME_FAILED: store.OUTCOME_FAILED,
    worker_service_pb2.TASK_OUTCOME_TIMED_OUT: store.OUTCOME_TIMED_OUT,
    worker_service_pb2.TASK_OUTCOME_CANCELLED: store.OUTCOME_CANCELLED,
    worker_service_pb2.TASK_OUTCOME_INTERRUPTED: store.OUTCOME_INTERRUPTED,
    # The payload's key is not the worker's: the handler never ran.
    worker_service_pb2.TASK_OUTCOME_KEY_UNAVAILABLE: store.OUTCOME_NOT_STARTED,
}


@dataclass
class Mapped:
    """One Results or Heartbeat message, checked: what goes to the store and what not.

    ``stored`` holds the positions (in the message) of the entries sent to the store,
    whose answers come back in that order; ``refused`` the others, with the reason.
    """

    size: int
    stored: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    missing_keys: set[str] | None = None
    """Encryption key ids the worker reported it does not hold (KEY_UNAVAILABLE)."""

    def answers(self, stored_answers: Sequence[bool]) -> list[tuple[bool, str]]:
        """(accepted, reason) for every entry of the message, in order."""
        out: list[tuple[bool, str]] = [(False, "")] * self.size
        for index, reason in self.refused.items():
            out[index] = (False, reason)
        for index, ok in zip(self.stored, stored_answers, strict=True):
            out[index] = (ok, "" if ok else leases.REFUSED_NOT_CURRENT)
        return out


def storable_error(text: str) -> str:
    """An error text PostgreSQL takes: no NUL bytes, at most MAX_ERROR_CHARS."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return text


def map_results(
    tenant: str,
    worker_id: str,
    results: Sequence[worker_service_pb2.TaskResult],
    *,
    max_result_bytes: int,
) -> tuple[Mapped, list[Outcome]]:
    """Checks one Results message; returns the mapping and the outcomes to store."""
    mapped = Mapped(len(results))
    items: list[Outcome] = []
    for index, result in enumerate(results):
        key = leases.parse(tenant, worker_id, result.lease)
        if key is None:
            mapped.refused[index] = leases.REFUSED_MALFORMED
            continue
        outcome = _OUTCOMES.get(result.outcome)
        if outcome is None:
            mapped.refused[index] = f"{leases.REFUSED_UNKNOWN_OUTCOME} {result.outcome}"
            continue
        error = storable_error(result.error)
        retryable = result.retryable and outcome != store.OUTCOME_CANCELLED
        value: bytes | None = None
        if outcome == store.OUTCOME_NOT_STARTED:
            if mapped.missing_keys is None:
                mapped.missing_keys = set()
            mapped.missing_keys.add(result.key_id)
        elif outcome == store.OUTCOME_SUCCEEDED:
            value = result.result
            if len(value) > max_result_bytes:
                outcome, value, retryable = store.OUTCOME_FAILED, None, False
                error = (
                    f"the result is {len(result.result)} bytes, more than the coordinator "
                    f"takes ({max_result_bytes}, max_payload_bytes): return less, or store it "
                    "elsewhere and return a reference"
                )
        mapped.stored.append(index)
        items.append(Outcome(key, outcome, value, error, retryable))
    return mapped, items


def map_leases(
    tenant: str, worker_id: str, wire: Sequence[worker_service_pb2.Lease]
) -> tuple[Mapped, list[LeaseKey]]:
    """Checks one Heartbeat's leases; returns the mapping and the keys to renew."""
    mapped = Mapped(len(wire))
    keys: list[LeaseKey] = []
    for index, lease in enumerate(wire):
        key = leases.parse(tenant, worker_id, lease)
        if key is None:
            mapped.refused[index] = leases.REFUSED_MALFORMED
        else:
            mapped.stored.append(index)
            keys.append(key)
    return mapped, keys


class ResultRecorder:
    """Owns the result and renewal batchers (started with the process, not the term)."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        cfg = deps.config
        on_flush = deps.metrics.record_flush if deps.metrics is not None else None
        # One item per worker message (a list of results or leases), so a message costs
        # one future however many results it carries.
        self.results: Batcher[Sequence[Outcome], list[bool]] = Batcher(
            "result",
            self._flush_results,
            max_batch=cfg.max_batch,
            max_pending=cfg.max_pending_operations,
            concurrency=2,
            on_flush=on_flush,
        )
        self.renewals: Batcher[Sequence[LeaseKey], list[bool]] = Batcher(
            "renewal",
            self._flush_renewals,
            max_batch=cfg.max_batch,
            max_pending=cfg.max_pending_operations,
            on_flush=on_flush,
        )

    def start(self) -> None:
        self.results.start()
        self.renewals.start()

    async def stop(self) -> None:
        await self.results.stop()
        await self.renewals.stop()

    async def _flush_results(self, messages: Sequence[Sequence[Outcome]]) -> list[list[bool]]:
        outcomes = [o for message in messages for o in message]
        deps = self._deps
        # One statement applies every result and records the attempts, fence included;
        # the rare refusals are recorded after it (they change no task).
        async with deps.db.read() as conn:
            applied_rows = await store.finish_attempts(conn, outcomes, deps.office.fence())
            applied = leases.keys_of(applied_rows)
            refused = [o for o in outcomes if o.key not in applied]
            if refused:
                await store.record_refused(conn, refused, leases.REFUSED_NOT_CURRENT)
        if deps.metrics is not None:
            deps.metrics.record_results(applied_rows)
            deps.metrics.record_refused(len(refused))
        deps.watchers.changed(row["id"] for row in applied_rows)
        for row in applied_rows:
            if row["state"] == store.SCHEDULED:
                deps.events.scheduled(row["run_at"])
            elif row["state"] == store.PENDING:
                deps.events.ready(row["tenant"], row["queue"])
        return [[o.key in applied for o in message] for message in messages]

    async def _flush_renewals(self, messages: Sequence[Sequence[LeaseKey]]) -> list[list[bool]]:
        keys = [k for message in messages for k in message]
        async with self._deps.db.read() as conn:
            renewed = await store.renew_leases(
                conn, keys, self._deps.config.lease_duration, self._deps.office.fence()
            )
        if self._deps.metrics is not None:
            self._deps.metrics.record_refused(sum(1 for k in keys if k not in renewed))
        return [[k in renewed for k in message] for message in messages]
