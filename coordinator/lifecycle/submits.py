"""Submits: validated tasks written in group-committed transactions, idempotency included.

A submit is acknowledged only after its transaction commits. Idempotency keys are scoped
per tenant: the same key with the same request returns the first task (``deduplicated``);
the same key with a different request fails with IDEMPOTENCY_KEY_CONFLICT and writes
nothing. A SubmitTasks batch is one group: all of it is written, or none of it.

A client-made ``request_id`` becomes the task's id, so a resend of a submit whose answer
was lost meets its own row: the same request returns that task (``deduplicated``), another
request with the same id fails like a key conflict. That costs nothing on the way in:
such tasks go the fast way (hand-off, COPY) like any other, and only when the store
refuses an id as taken is the flush done again the careful way, looking each id up.

Two lanes of group commit: submits of up to ``SMALL_SUBMIT_MAX`` tasks and larger ones
flush apart, so a lone submit never waits behind another caller's batch. The lanes may
commit at the same moment; two submits with one idempotency key (or id) racing through
both lanes are settled by the unique index: one is written, and the other's flush plans
again against it, so that submit alone is answered with the first (deduplicated, or a
conflict) and the rest of its flush is written (``Submitter._flush_checked``).

If the store loses its connection while a flush commits, every caller of that flush hears
OUTCOME_UNKNOWN (their tasks may exist). If the store refuses a flush outright, nothing
was written, and the batcher retries its groups one by one so that only the group the
store refuses fails (see ``batcher.py``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
from google.protobuf import timestamp_pb2

from conveyor.coordinator import convert
from conveyor.coordinator.api import validation
from conveyor.coordinator.api.validation import SUBMIT_SLICE, NewTask
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import ConveyorError, IdempotencyKeyConflict, StoreUnavailable
from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.lifecycle import dependents
from conveyor.coordinator.lifecycle.batcher import Batcher, group_commit
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.lifecycle.transitions import ID, Cause, Row
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import committing
from conveyor.coordinator.store.tasks import NewRow
from conveyor.v1 import task_pb2, task_service_pb2

# Batches of at least this many new tasks without idempotency keys are written with COPY.
COPY_THRESHOLD = 64
# Times a flush plans again after losing a race for a key or id (see _flush_checked).
MAX_RACE_ROUNDS = 3
# Submits of at most this many tasks have their own group commit (a lane): a lone submit
# never shares a flush with, or waits for, another caller's batch of hundreds, whose
# encoding and COPY take tens of milliseconds (one tenant's bulk submits would otherwise
# set every other tenant's submit latency). A flush of this lane, many such submits, may
# be handed off whole up to ``leases.HAND_OFF_MAX`` tasks.
SMALL_SUBMIT_MAX = 16


class HandOff(Protocol):
    """Where a fresh submit can lease at once (the dispatcher's hand-off)."""

    def reserve(self, rows: Sequence[NewRow]) -> Sequence[Any]:
        """A waiting worker for every row, reserved; empty when not all rows have one."""

    async def hand_off(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[NewRow],
        reserved: Sequence[Any],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> list[LeaseKey]:
        """Inserts the rows leased to the reserved workers; their leases, in row order."""


@dataclass(frozen=True)
class SubmitGroup:
    """Tasks submitted by one call; written all together or not at all."""

    tenant: str
    tasks: Sequence[NewTask]
    has_dependencies: bool = False
    """Some task lists ``after`` or ``after_refs``: the group goes the careful way
    (``dependents.py``), and a group without them pays nothing for the feature."""


class Submitted:
    """One task's answer: the task as committed, and whether it was a resend.

    A new task's message is built only when something asks for it (:attr:`task`):
    SubmitTasks encodes most answers from one encoding shared by the tasks of a batch
    that differ only in their id (:meth:`entry`, ``convert.new_answer_parts``).
    """

    __slots__ = ("_fresh", "_task", "deduplicated")

    def __init__(
        self, task: task_pb2.Task | None, deduplicated: bool, fresh: Fresh | None = None
    ) -> None:
        self._task = task
        self._fresh = fresh
        """A new task's (tenant, id, NewTask, state, run_at, now, shared encoding or None):
        a plain tuple, since a NamedTuple made per task showed in the profile (5 %)."""
        self.deduplicated = deduplicated

    @property
    def task(self) -> task_pb2.Task:
        """The Task message (built at the first call; changes to it are the answer's)."""
        if self._task is None:
            assert self._fresh is not None
            tenant, task_id, task, state, run_at, now, _ = self._fresh
            self._task = convert.task_from_new(tenant, task_id, task, state, run_at, now)
        return self._task

    def entry(self) -> bytes:
        """This answer as one encoded entry of ``SubmitTasksResponse.results``."""
        fresh = self._fresh
        if self._task is None and fresh is not None and fresh[6] is not None:
            task_id = str(fresh[1])
            if len(task_id) == convert.ID_LENGTH:
                head, tail = fresh[6]
                return head + task_id.encode() + tail
        return convert.response_entry(
            task_service_pb2.SubmitTaskResponse(
                task=self.task, deduplicated=self.deduplicated
            ).SerializeToString()
        )


Fresh = tuple[
    str,
    "uuid.UUID | str",
    NewTask,
    int,
    timestamp_pb2.Timestamp,
    timestamp_pb2.Timestamp,
    "tuple[bytes, bytes] | None",
]
"""What a new task's answer is made from (``convert.task_from_new``'s arguments), and the
shared encoding of its batch's answers (None: built from the message)."""


def _shape(task: NewTask, state: int, run_at: datetime) -> tuple[object, ...]:
    """What a new task's answer shows besides its id and tenant (the key of its shared
    encoding); labels are left out, since a task with labels is never shared."""
    return (
        task.queue, task.type, task.content_type, state, run_at, task.priority,
        task.max_attempts, task.idempotency_key, task.timeout_ms, task.retry_initial_ms,
        task.retry_max_ms, task.retry_multiplier, task.retry_jitter, task.traceparent,
        task.concurrency_key, task.concurrency_limit, task.deadline,
    )  # fmt: skip


SubmitResult = list[Submitted]


@dataclass(slots=True)
class _Prior:
    """A task a submit may turn out to repeat: its tenant, what it was made from (a stored
    row or a submit of this flush) and its message. The fingerprint is computed only when
    a repeat is found: hashing every payload on the way in would cost more than the rest
    of a submit's planning.

    Treat it as immutable. Not ``frozen``: one is made for every submitted task with a
    client-made id (every task the client library sends), and a frozen dataclass sets
    each field through ``object.__setattr__``: 1.2 µs a task against 0.14, two thirds of
    a batch's planning (issue 19, fourth round)."""

    tenant: str
    source: asyncpg.Record | NewTask
    answer: Submitted

    @property
    def task(self) -> task_pb2.Task:
        return self.answer.task

    def fingerprint(self) -> bytes:
        if isinstance(self.source, NewTask):
            return validation.request_fingerprint(self.source)
        return _row_fingerprint(self.source)


@dataclass
class _Plan:
    """What a flush found in the store, and what its groups took so far."""

    keys: dict[tuple[str, str], asyncpg.Record]
    ids: dict[str, asyncpg.Record]
    claimed_keys: dict[tuple[str, str], _Prior]
    claimed_ids: dict[str, _Prior]

    @classmethod
    def empty(cls) -> _Plan:
        return cls({}, {}, {}, {})


class Submitter:
    """Owns the submit batchers; what it commits takes the after-commit path."""

    def __init__(self, deps: Deps, *, hand_off: HandOff) -> None:
        self._deps = deps
        self._hand_off = hand_off

        self.batcher: Batcher[SubmitGroup, SubmitResult] = group_commit("submit", self._flush, deps)
        self.small: Batcher[SubmitGroup, SubmitResult] = group_commit("submit", self._flush, deps)
        """Submits of up to SMALL_SUBMIT_MAX tasks (``batcher`` takes the larger ones)."""
        self.races = 0
        """Flushes planned again after losing a key or id to the other lane."""

    def start(self) -> None:
        self.batcher.start()
        self.small.start()

    async def stop(self) -> None:
        """Flushes what is queued, then stops."""
        await asyncio.gather(self.batcher.stop(), self.small.stop())

    async def submit(self, group: SubmitGroup) -> SubmitResult:
        """Writes the group (admitted by the tenant's quotas already: ``tenancy/quotas.py``)."""
        weight = len(group.tasks)
        lane = self.small if weight <= SMALL_SUBMIT_MAX else self.batcher
        return await lane.submit(group, weight=weight)

    async def _flush(self, groups: Sequence[SubmitGroup]) -> list[SubmitResult | BaseException]:
        now = datetime.now(UTC)
        now_message = convert.timestamp(now)
        tasks = [t for g in groups for t in g.tasks]
        if not any(t.idempotency_key for t in tasks):
            try:
                if any(g.has_dependencies for g in groups):
                    return await self._flush_new_with_dependencies(groups, now, now_message)
                return await self._flush_new(groups, now, now_message)
            except asyncpg.UniqueViolationError:
                # A client-made id is taken: most likely a resend of a submit an earlier
                # send wrote. Nothing was written (one statement); do it the careful way.
                if not any(t.task_id is not None for t in tasks):
                    raise
        return await self._flush_checked(groups, now, now_message)

    async def _flush_new(
        self,
        groups: Sequence[SubmitGroup],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> list[SubmitResult | BaseException]:
        """Nothing to look up: one statement, atomic by itself (a hand-off, COPY or INSERT)."""
        results: list[SubmitResult | BaseException] = []
        rows: list[NewRow] = []
        plan = _Plan.empty()
        for group in groups:
            results.append(await self._plan_group_sliced(group, plan, now, now_message, rows))
        async with self._deps.db.autocommit() as conn:
            reserved = self._hand_off.reserve(rows)
            if reserved:
                keys = await self._hand_off.hand_off(conn, rows, reserved, now, now_message)
                _leased(results, keys)
                return results  # the hand-off published its transitions
            with committing():
                written = await self._write_unkeyed(conn, rows, now)
        self._deps.after_commit.publish(Cause.SUBMITTED, written)
        return results

    async def _flush_new_with_dependencies(
        self,
        groups: Sequence[SubmitGroup],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> list[SubmitResult | BaseException]:
        """Nothing to look up but the dependencies (``dependents.py``): one transaction
        writes the tasks (never handed off: some wait), their edges, and the release of
        those whose dependencies are finished already."""
        failed: dict[int, ConveyorError] = {}
        async with self._deps.db.write() as conn:
            await dependents.check_after(conn, groups, failed)
            results, rows, _ = self._plan_checked(groups, _Plan.empty(), failed, now, now_message)
            rows, edges = dependents.block(groups, results, rows)
            written = await self._write_unkeyed(conn, rows, now)
            released = await dependents.write_edges(conn, edges, results)
        self._deps.after_commit.publish(Cause.SUBMITTED, written)
        self._deps.after_commit.publish(Cause.RELEASED, released)
        return results

    async def _flush_checked(
        self,
        groups: Sequence[SubmitGroup],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> list[SubmitResult | BaseException]:
        """Looks up idempotency keys and client-made ids first, in one transaction.

        The other lane's flush may take a key or an id between the look-up and the insert
        (one key sent through both lanes at once). The insert skips such a row, and
        ON CONFLICT waited for that flush to end, so its row is committed by then and a
        new look-up sees it: this flush takes back what it inserted and plans again
        against what won, answering the racing submit as a resend (deduplicated) or a
        conflict, and writing every other group as before. Each round settles a key, so
        it ends; past MAX_RACE_ROUNDS a group whose key is taken yet again fails alone.
        """
        tasks = [(g.tenant, t) for g in groups for t in g.tasks]
        keys = sorted({(tenant, t.idempotency_key) for tenant, t in tasks if t.idempotency_key})
        ids = sorted({t.task_id for _, t in tasks if t.task_id is not None})
        failed: dict[int, ConveyorError] = {}
        with_deps = any(g.has_dependencies for g in groups)
        async with self._deps.db.write() as conn:
            priors = await store.find_priors(conn, keys, ids)
            if with_deps:
                await dependents.check_after(conn, groups, failed)
            for round_ in itertools.count(1):
                results, rows, starts = self._plan_checked(
                    groups, _Plan(*priors, {}, {}), failed, now, now_message
                )
                if with_deps:
                    rows, edges = dependents.block(groups, results, rows)
                checked = [r for r in rows if r.task.idempotency_key or r.task.task_id is not None]
                inserted = await store.insert(conn, checked, now) if checked else []
                if len(inserted) == len(checked):
                    break
                await store.take_back(conn, [r[ID] for r in inserted])
                self.races += 1
                if round_ > MAX_RACE_ROUNDS:
                    taken = {r[ID] for r in inserted}
                    for position, row in enumerate(rows):
                        looked_up = row.task.idempotency_key or row.task.task_id is not None
                        if looked_up and str(row.id) not in taken:
                            group = bisect.bisect_right(starts, position) - 1
                            failed[group] = StoreUnavailable(
                                "a concurrent submit took the same idempotency key or id"
                            )
                priors = await store.find_priors(conn, keys, ids)
            unkeyed = await self._write_unkeyed(
                conn,
                [r for r in rows if not r.task.idempotency_key and r.task.task_id is None],
                now,
            )
            released: Sequence[Row] = []
            if with_deps:
                released = await dependents.write_edges(conn, edges, results)
        self._deps.after_commit.publish(Cause.SUBMITTED, [*inserted, *unkeyed])
        self._deps.after_commit.publish(Cause.RELEASED, released)
        return results

    def _plan_checked(
        self,
        groups: Sequence[SubmitGroup],
        plan: _Plan,
        failed: dict[int, ConveyorError],
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> tuple[list[SubmitResult | BaseException], list[NewRow], list[int]]:
        """Plans every group but the failed ones: their results, the new rows, and where
        each group's rows start among them."""
        results: list[SubmitResult | BaseException] = []
        rows: list[NewRow] = []
        starts: list[int] = []
        for i, group in enumerate(groups):
            starts.append(len(rows))
            if i in failed:
                results.append(failed[i])
            else:
                results.append(self._plan_group(group, plan, now, now_message, rows))
        return results, rows, starts

    @staticmethod
    async def _write_unkeyed(
        conn: asyncpg.Connection, rows: list[NewRow], now: datetime
    ) -> Sequence[Row]:
        """Writes rows without keys; returns their transitions."""
        # COPY costs an extra round trip but half the encoding: it wins for batches and
        # loses for the lone submit whose latency is what matters.
        # Either fails as a whole when an id is taken (only a client-made one can be).
        if len(rows) >= COPY_THRESHOLD and store.COPY_USABLE:
            return await store.copy_new(conn, rows, now)
        if rows:
            return await store.insert_new(conn, rows, now)
        return []

    @staticmethod
    def _plan_group(
        group: SubmitGroup,
        plan: _Plan,
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
        rows: list[NewRow],
    ) -> SubmitResult | ConveyorError:
        planned = _GroupPlan()
        failed = planned.add(group, group.tasks, plan, now, now_message)
        return failed if failed is not None else planned.finish(plan, rows)

    @staticmethod
    async def _plan_group_sliced(
        group: SubmitGroup,
        plan: _Plan,
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
        rows: list[NewRow],
    ) -> SubmitResult | ConveyorError:
        """:meth:`_plan_group`, yielding to the event loop after every SUBMIT_SLICE tasks
        (a batch of 500 is ~10 ms of planning that would hold every other call)."""
        planned = _GroupPlan()
        tasks = group.tasks
        for start in range(0, len(tasks), SUBMIT_SLICE):
            if start:
                await asyncio.sleep(0)
            part = tasks[start : start + SUBMIT_SLICE]
            failed = planned.add(group, part, plan, now, now_message)
            if failed is not None:
                return failed
        return planned.finish(plan, rows)


@dataclass
class _GroupPlan:
    """One group's plan while it is made (maybe a slice at a time): its answers, its new
    rows, and the keys and ids it claims; added to the flush's plan when it is whole."""

    out: SubmitResult = field(default_factory=list)
    new_rows: list[NewRow] = field(default_factory=list)
    new_keys: dict[tuple[str, str], _Prior] = field(default_factory=dict)
    new_ids: dict[str, _Prior] = field(default_factory=dict)
    shared: dict[tuple[object, ...], tuple[bytes, bytes]] = field(default_factory=dict)
    """The shared encodings of the group's answers, by shape (:func:`_shape`)."""

    def add(
        self,
        group: SubmitGroup,
        tasks: Sequence[NewTask],
        plan: _Plan,
        now: datetime,
        now_message: timestamp_pb2.Timestamp,
    ) -> ConveyorError | None:
        """Plans ``tasks`` (of ``group``); a conflict fails the whole group."""
        out, new_rows, new_keys, new_ids = self.out, self.new_rows, self.new_keys, self.new_ids
        shared = self.shared
        for task in tasks:
            key = (group.tenant, task.idempotency_key) if task.idempotency_key else None
            if key is not None:
                prior = new_keys.get(key) or plan.claimed_keys.get(key)
                if prior is None and key in plan.keys:
                    row = plan.keys[key]
                    prior = _Prior(key[0], row, Submitted(convert.task_from_row(row), True))
                if prior is not None:
                    if prior.fingerprint() != validation.request_fingerprint(task):
                        return IdempotencyKeyConflict(key[1], prior.task.id)
                    out.append(Submitted(prior.task, deduplicated=True))
                    continue
            if task.task_id is not None:
                prior = new_ids.get(task.task_id) or plan.claimed_ids.get(task.task_id)
                if prior is None and task.task_id in plan.ids:
                    row = plan.ids[task.task_id]
                    found = Submitted(convert.task_from_row(row), True)
                    prior = _Prior(row["tenant"], row, found)
                if prior is not None:
                    if prior.tenant != group.tenant or (
                        prior.fingerprint() != validation.request_fingerprint(task)
                    ):
                        return IdempotencyKeyConflict.for_request_id(task.task_id)
                    out.append(Submitted(prior.task, deduplicated=True))
                    continue
            task_id = task.task_id or uuid7()
            if task.run_at is not None and task.run_at > now:
                run_at, state = task.run_at, store.SCHEDULED
                run_at_message = convert.timestamp(run_at)
            else:
                run_at, state, run_at_message = now, store.PENDING, now_message
            parts: tuple[bytes, bytes] | None = None
            if not task.labels:  # a dict: no key (and most tasks have none)
                shape = _shape(task, state, run_at)
                parts = shared.get(shape)
                if parts is None:
                    parts = shared[shape] = convert.new_answer_parts(
                        group.tenant, task, state, run_at_message, now_message
                    )
            answer = Submitted(
                None,
                False,
                (group.tenant, task_id, task, state, run_at_message, now_message, parts),
            )
            new_rows.append(NewRow(group.tenant, task_id, task, state, run_at))
            if key is not None:
                new_keys[key] = _Prior(group.tenant, task, answer)
            if task.task_id is not None:
                new_ids[task.task_id] = _Prior(group.tenant, task, answer)
            out.append(answer)
        return None

    def finish(self, plan: _Plan, rows: list[NewRow]) -> SubmitResult:
        rows.extend(self.new_rows)
        plan.claimed_keys.update(self.new_keys)
        plan.claimed_ids.update(self.new_ids)
        return self.out


def _leased(results: Sequence[SubmitResult | BaseException], keys: Sequence[LeaseKey]) -> None:
    """The answers of handed-off tasks, planned as PENDING: RUNNING, in their first attempt."""
    by_id = {
        s.task.id: s.task
        for result in results
        if not isinstance(result, BaseException)
        for s in result
    }
    for key in keys:
        message = by_id[key.task_id]
        message.state = store.RUNNING
        message.attempt = key.attempt
        message.worker_id = key.worker_id


def _row_fingerprint(row: asyncpg.Record) -> bytes:
    """The request fingerprint of a stored task (what validation computes for a submit)."""
    if row["request_hash"]:
        return bytes(row["request_hash"])
    labels = row["labels"]
    task = validation.NewTask(
        queue=row["queue"],
        type=row["type"],
        payload=bytes(row["payload"]),
        content_type=row["content_type"],
        priority=row["priority"],
        max_attempts=row["max_attempts"],
        idempotency_key=row["idempotency_key"],
        request_hash=b"",
        run_at=None,
        timeout_ms=row["timeout_ms"],
        retry_initial_ms=row["retry_initial_ms"],
        retry_max_ms=row["retry_max_ms"],
        retry_multiplier=row["retry_multiplier"],
        retry_jitter=row["retry_jitter"],
        labels=json.loads(labels) if isinstance(labels, str) else dict(labels or {}),
        traceparent="",
        concurrency_key=row["concurrency_key"],
        concurrency_limit=row["concurrency_limit"],
        deadline=row["deadline"],
    )
    return validation.request_fingerprint(task)
