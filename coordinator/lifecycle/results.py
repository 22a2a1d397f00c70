"""Workers' results: mapped from the wire, group-committed, matched by lease key.

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

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.lifecycle import leases
from conveyor.coordinator.lifecycle.batcher import Batcher, group_commit
from conveyor.coordinator.lifecycle.leases import Mapped
from conveyor.coordinator.lifecycle.transitions import COLUMNS, Cause
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.tasks import Outcome
from conveyor.transport._error_text import storable_error
from conveyor.v1 import worker_service_pb2

# Where finish_attempts puts the position of each result it applied (after the columns).
APPLIED = len(COLUMNS)

_OUTCOMES = {
    worker_service_pb2.TASK_OUTCOME_SUCCEEDED: store.OUTCOME_SUCCEEDED,
    worker_service_pb2.TASK_OUTCOME_FAILED: store.OUTCOME_FAILED,
    worker_service_pb2.TASK_OUTCOME_TIMED_OUT: store.OUTCOME_TIMED_OUT,
    worker_service_pb2.TASK_OUTCOME_CANCELLED: store.OUTCOME_CANCELLED,
    worker_service_pb2.TASK_OUTCOME_INTERRUPTED: store.OUTCOME_INTERRUPTED,
    # The payload's key is not the worker's: the handler never ran.
    worker_service_pb2.TASK_OUTCOME_KEY_UNAVAILABLE: store.OUTCOME_NOT_STARTED,
}


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


class ResultRecorder:
    """Owns the result batcher (started with the process, not the term)."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        # One item per worker message (a list of results), so a message costs one future
        # however many results it carries.
        self.results: Batcher[Sequence[Outcome], list[bool]] = group_commit(
            "result", self._flush_results, deps, concurrency=2
        )

    def start(self) -> None:
        self.results.start()

    async def stop(self) -> None:
        await self.results.stop()

    async def _flush_results(self, messages: Sequence[Sequence[Outcome]]) -> list[list[bool]]:
        outcomes = [o for message in messages for o in message]
        deps = self._deps
        # One statement applies the results of tasks without dependents and records the
        # attempts, fence included (without the release of dependents, which is most of
        # its planning); what it did not apply (tasks with dependents, stale leases) goes
        # through the full statement; the rare refusals are recorded after (they change
        # no task). Each statement is atomic for the results it applies.
        fence = deps.office.fence()
        async with deps.db.results() as conn:
            rows = await store.finish_attempts_plain(conn, outcomes, fence)
            applied = {row[APPLIED] for row in rows}
            if len(applied) < len(outcomes):
                rest = [i for i in range(len(outcomes)) if i not in applied]
                more = await store.finish_attempts(conn, [outcomes[i] for i in rest], fence)
                rows = [*rows, *more]
                # Its positions are in ``rest`` (None: a dependent it released).
                applied.update(rest[row[APPLIED]] for row in more if row[APPLIED] is not None)
            refused = [o for i, o in enumerate(outcomes) if i not in applied]
            if refused:
                await store.record_refused(conn, refused, leases.REFUSED_NOT_CURRENT)
        deps.metrics.record_refused(len(refused))
        deps.after_commit.publish(Cause.FINISHED, rows)
        answers = iter([i in applied for i in range(len(outcomes))])
        return [[next(answers) for _ in message] for message in messages]
