"""Submits: validated tasks written in group-committed transactions, idempotency included.

A submit is acknowledged only after its transaction commits. Idempotency keys are scoped
per tenant: the same key with the same request returns the first task (``deduplicated``);
the same key with a different request fails with IDEMPOTENCY_KEY_CONFLICT and writes
nothing. A SubmitTasks batch is one group: all of it is written, or none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from google.protobuf import timestamp_pb2

from conveyor.coordinator import convert
from conveyor.coordinator.batcher import Batcher
from conveyor.coordinator.errors import ConveyorError, IdempotencyKeyConflict, StoreUnavailable
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.validation import NewTask
from conveyor.v1 import task_pb2


@dataclass(frozen=True)
class SubmitGroup:
    """Tasks submitted by one call; written all together or not at all."""

    tenant: str
    tasks: Sequence[NewTask]


@dataclass(frozen=True)
class Submitted:
    task: task_pb2.Task
    deduplicated: bool


SubmitResult = list[Submitted]


class Submitter:
    """Owns the submit batcher and tells the dispatcher about new ready work after commit."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int,
        max_pending: int,
        on_ready: Callable[[str, str], None],
        on_scheduled: Callable[[datetime], None],
    ) -> None:
        self._pool = pool
        self._on_ready = on_ready
        self._on_scheduled = on_scheduled
        self.batcher: Batcher[SubmitGroup, SubmitResult] = Batcher(
            "submit", self._flush, max_batch=max_batch, max_pending=max_pending
        )

    async def submit(self, group: SubmitGroup) -> SubmitResult:
        return await self.batcher.submit(group, weight=len(group.tasks))

    async def _flush(self, groups: Sequence[SubmitGroup]) -> list[SubmitResult | BaseException]:
        now = datetime.now(UTC)
        now_message = convert.timestamp(now)
        keys = sorted(
            {(g.tenant, t.idempotency_key) for g in groups for t in g.tasks if t.idempotency_key}
        )
        results: list[SubmitResult | BaseException] = []
        rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]] = []
        async with self._pool.acquire() as conn:
            if not keys:
                # Nothing to deduplicate: one COPY, atomic by itself.
                for group in groups:
                    results.append(self._plan_group(group, {}, {}, now, now_message, rows))
                if rows:
                    await store.copy_new(conn, rows, now)
            else:
                async with conn.transaction():
                    existing = await store.find_by_idempotency_keys(conn, keys)
                    # Keys claimed by earlier groups of this batch: (hash, message, dedup).
                    claimed: dict[tuple[str, str], tuple[bytes, task_pb2.Task, bool]] = {}
                    for group in groups:
                        results.append(
                            self._plan_group(group, existing, claimed, now, now_message, rows)
                        )
                    keyed = [r for r in rows if r[2].idempotency_key]
                    inserted = await store.insert(conn, keyed, now) if keyed else set()
                    if len(inserted) != len(keyed):
                        # Another transaction took a key between our look-up and insert
                        # (only possible with two writers); fail so clients retry cleanly.
                        raise StoreUnavailable("a concurrent submit took the same idempotency key")
                    unkeyed = [r for r in rows if not r[2].idempotency_key]
                    if unkeyed:
                        await store.copy_new(conn, unkeyed, now)
        for tenant, queue in {(r[0], r[2].queue) for r in rows if r[3] == store.PENDING}:
            self._on_ready(tenant, queue)
        scheduled = [r[4] for r in rows if r[3] == store.SCHEDULED]
        if scheduled:
            self._on_scheduled(min(scheduled))
        return results

    def _plan_group(
        self,
        group: SubmitGroup,
        existing: dict[tuple[str, str], asyncpg.Record],
        claimed: dict[tuple[str, str], tuple[bytes, task_pb2.Task, bool]],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
        rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]],
    ) -> SubmitResult | ConveyorError:
        out: SubmitResult = []
        new_rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]] = []
        new_claims: dict[tuple[str, str], tuple[bytes, task_pb2.Task, bool]] = {}
        for task in group.tasks:
            key = (group.tenant, task.idempotency_key) if task.idempotency_key else None
            if key is not None:
                prior = new_claims.get(key) or claimed.get(key)
                if prior is None and key in existing:
                    row = existing[key]
                    prior = (bytes(row["request_hash"] or b""), convert.task_from_row(row), True)
                if prior is not None:
                    prior_hash, prior_task, _ = prior
                    if prior_hash != task.request_hash:
                        return IdempotencyKeyConflict(key[1], prior_task.id)
                    out.append(Submitted(prior_task, deduplicated=True))
                    continue
            task_id = uuid7()
            if task.run_at is not None and task.run_at > now:
                run_at, state = task.run_at, store.SCHEDULED
                run_at_message = convert.timestamp(run_at)
            else:
                run_at, state, run_at_message = now, store.PENDING, now_message
            message = convert.task_from_new(
                group.tenant, task_id, task, state, run_at_message, now_message
            )
            new_rows.append((group.tenant, task_id, task, state, run_at))
            if key is not None:
                new_claims[key] = (task.request_hash, message, False)
            out.append(Submitted(message, deduplicated=False))
        rows.extend(new_rows)
        claimed.update(new_claims)
        return out
