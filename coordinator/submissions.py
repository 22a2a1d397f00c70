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
from conveyor.coordinator.dispatcher import Dispatcher
from conveyor.coordinator.errors import ConveyorError, IdempotencyKeyConflict, StoreUnavailable
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.sessions import WorkerSession
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.leadership import Fence
from conveyor.coordinator.validation import NewTask
from conveyor.v1 import task_pb2

# Batches of at least this many new tasks without idempotency keys are written with COPY.
COPY_THRESHOLD = 64
# Flushes of at most this many tasks may be handed straight to waiting workers.
HAND_OFF_MAX = 16


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
        dispatcher: Dispatcher,
        *,
        fence: Callable[[], Fence],
        lease_seconds: float,
        max_batch: int,
        max_pending: int,
        on_scheduled: Callable[[datetime], None],
    ) -> None:
        self._pool = pool
        self._dispatcher = dispatcher
        self._fence = fence
        self._lease_seconds = lease_seconds
        self._on_ready = dispatcher.wake
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
                # Nothing to deduplicate: one statement, atomic by itself.
                for group in groups:
                    results.append(self._plan_group(group, {}, {}, now, now_message, rows))
                sessions = self._reserve_hand_off(rows)
                if sessions:
                    try:
                        await self._hand_off(conn, rows, sessions, results, now, now_message)
                    except BaseException:
                        for session in sessions:
                            self._dispatcher.give_back(session, 1)
                        raise
                    return results
                await self._write_unkeyed(conn, rows, now)
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
                    await self._write_unkeyed(
                        conn, [r for r in rows if not r[2].idempotency_key], now
                    )
        for tenant, queue in {(r[0], r[2].queue) for r in rows if r[3] == store.PENDING}:
            self._on_ready(tenant, queue)
        scheduled = [r[4] for r in rows if r[3] == store.SCHEDULED]
        if scheduled:
            self._on_scheduled(min(scheduled))
        return results

    def _reserve_hand_off(
        self, rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]]
    ) -> list[WorkerSession]:
        """A waiting worker for every row, credit reserved; [] unless all rows have one.

        Only small flushes of tasks ready now are handed off: that is the lightly loaded
        case, where pickup latency is what counts; under load the dispatcher's batched
        claims are cheaper.
        """
        if len(rows) > HAND_OFF_MAX or any(r[3] != store.PENDING for r in rows):
            return []
        sessions: list[WorkerSession] = []
        for tenant, _id, task, _state, _run_at in rows:
            session = self._dispatcher.take_idle(tenant, task.queue, task.type)
            if session is None:
                for taken in sessions:
                    self._dispatcher.give_back(taken, 1)
                return []
            sessions.append(session)
        return sessions

    async def _hand_off(
        self,
        conn: asyncpg.Connection,
        rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]],
        sessions: list[WorkerSession],
        results: list[SubmitResult | BaseException],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> None:
        """Inserts the rows leased to their sessions, then pushes the assignments."""
        fence = self._fence()
        leased = [(t, i, task, store.RUNNING, r) for t, i, task, _s, r in rows]
        with leadership.fencing(fence):
            await store.insert_leased(
                conn,
                leased,
                [s.worker_id for s in sessions],
                fence,
                self._lease_seconds,
                now,
            )
        # The answers were planned as PENDING: they are RUNNING, attempt 1, now.
        by_id = {
            s.task.id: s.task
            for result in results
            if not isinstance(result, BaseException)
            for s in result
        }
        for session, (_tenant, task_id, task, _state, _run_at) in zip(sessions, rows, strict=True):
            message = by_id[str(task_id)]
            message.state = store.RUNNING  # type: ignore[assignment]
            message.attempt = 1
            message.worker_id = session.worker_id
            await self._dispatcher.deliver(
                session, [convert.assignment_from_new(task_id, task, fence.epoch, now_message)]
            )

    @staticmethod
    async def _write_unkeyed(
        conn: asyncpg.Connection,
        rows: list[tuple[str, uuid.UUID, NewTask, int, datetime]],
        now: datetime,
    ) -> None:
        # COPY costs an extra round trip but half the encoding: it wins for batches and
        # loses for the lone submit whose latency is what matters.
        if len(rows) >= COPY_THRESHOLD:
            await store.copy_new(conn, rows, now)
        elif rows:
            await store.insert(conn, rows, now)

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
