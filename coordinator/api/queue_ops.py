"""Queue operations, the operator's half of ``TaskService``: pause and resume a queue, and
the dead-letter tools (list, group, bulk redrive, delete).

``TaskServicer`` delegates ListQueues, PauseQueue, ResumeQueue, ListDeadTasks,
ListDeadTaskGroups, RetryTasks and DeleteTasks here. Any coordinator answers ListQueues
and the dead-letter lists from PostgreSQL; what only the leader's memory holds is said per
field in :meth:`QueueOps.list_queues`. Every call acts for the caller's tenant only (the
request context's), like the rest of TaskService. A redrive is a state change, so it
takes the one seam: a ``store.tasks`` statement with the transitions tail, published as
``Cause.REDRIVEN``. A bulk call by filter works in statements of :data:`BATCH` tasks, each
its own transaction, so a large redrive or purge never holds many row locks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from conveyor.coordinator import convert
from conveyor.coordinator.api import context, pages
from conveyor.coordinator.api.rate_limits import RateLimitService, of_queue
from conveyor.coordinator.api.validation import (
    MAX_BATCH,
    MAX_PAGE_SIZE,
    check_name,
    check_page_size,
    check_text,
    check_timestamp,
)
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.dispatch import policy as dispatch_policy
from conveyor.coordinator.dispatch.breakers import Breakers, State
from conveyor.coordinator.errors import FieldViolation, InvalidArgument, NotLeader
from conveyor.coordinator.ids import parse_task_id
from conveyor.coordinator.lifecycle.transitions import Cause
from conveyor.coordinator.store import breakers as breaker_store
from conveyor.coordinator.store import queues as queue_store
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.tasks import DeadFilter
from conveyor.v1 import task_pb2, task_service_pb2

if TYPE_CHECKING:
    from conveyor.coordinator.lifecycle.leases import Dispatcher

BATCH = 1000
"""Tasks one statement of a bulk call by filter redrives or deletes."""
DEFAULT_MAX_TASKS = 10_000
MAX_MAX_TASKS = 100_000
DEFAULT_COUNT_LIMIT = 10_000
"""The cap on each queue's pending, scheduled and dead counts when a ListQueues names none,
and for PauseQueue and ResumeQueue: each count reads at most this many index entries (plus
one), a few milliseconds a queue however deep it is (docs/performance.md, issue 19,
seventh round)."""
MAX_COUNT_LIMIT = 1_000_000
"""The largest cap a ListQueues may ask for: about a quarter of a second of PostgreSQL per
deep queue (221 ms measured at 10,000,000 waiting)."""
SETTLE_TIMEOUT = 2.0
"""Longest PauseQueue waits for a dispatch round under way to end."""

# By State or by the number it is stored as (an IntEnum hashes as its int).
_BREAKER_STATES: dict[int, task_pb2.CircuitBreakerState.ValueType] = {
    State.CLOSED: task_pb2.CIRCUIT_BREAKER_STATE_CLOSED,
    State.HALF_OPEN: task_pb2.CIRCUIT_BREAKER_STATE_HALF_OPEN,
    State.OPEN: task_pb2.CIRCUIT_BREAKER_STATE_OPEN,
}

_RETRY_STATES = frozenset(store.REDRIVABLE)
_FINISHED_STATES = frozenset(store.TERMINAL)


def _state_names(states: Sequence[int] | frozenset[int]) -> str:
    return ", ".join(
        task_pb2.TaskState.Name(task_pb2.TaskState.ValueType(s)) for s in sorted(states)
    )


def dead_filter(
    tenant: str,
    message: task_service_pb2.DeadTaskFilter,
    allowed: frozenset[int],
    out: list[FieldViolation],
) -> DeadFilter:
    """A DeadTaskFilter checked: violations go to ``out`` (``filter.<field>``)."""
    check_name(message.queue, "filter.queue", out, required=False)
    check_name(message.type, "filter.type", out, required=False)
    check_text(
        message.fingerprint,
        "filter.fingerprint",
        out,
        max_length=store.FINGERPRINT_LENGTH,
        identifier=False,
    )
    after = (
        check_timestamp(message.finished_after, "filter.finished_after", out)
        if message.HasField("finished_after")
        else None
    )
    before = (
        check_timestamp(message.finished_before, "filter.finished_before", out)
        if message.HasField("finished_before")
        else None
    )
    if after is not None and before is not None and before <= after:
        out.append(
            FieldViolation("filter.finished_before", "must be later than filter.finished_after")
        )
    states = set(message.states) or {store.DEAD}
    wrong = states - allowed
    if wrong:
        named = ", ".join(
            task_pb2.TaskState.Name(task_pb2.TaskState.ValueType(s))
            if s in task_pb2.TaskState.values()
            else str(s)
            for s in sorted(wrong)
        )
        out.append(
            FieldViolation(
                "filter.states", f"{named} not allowed here: only {_state_names(allowed)}"
            )
        )
    return DeadFilter(
        tenant=tenant,
        states=tuple(sorted(states & allowed)) or (store.DEAD,),
        queue=message.queue or None,
        type=message.type or None,
        fingerprint=message.fingerprint or None,
        after=after,
        before=before,
    )


def _ids(values: Sequence[str], out: list[FieldViolation]) -> list[uuid.UUID]:
    if len(values) > MAX_BATCH:
        out.append(FieldViolation("ids", f"must hold at most {MAX_BATCH} ids (got {len(values)})"))
        return []
    parsed: list[uuid.UUID] = []
    for i, value in enumerate(values):
        task_id = parse_task_id(value)
        if task_id is None:
            out.append(
                FieldViolation(
                    f"ids[{i}]", f"{value[:64]!r} is not a task id (a UUID such as 0190...)"
                )
            )
        else:
            parsed.append(task_id)
    return parsed


def _bulk(
    request: task_service_pb2.RetryTasksRequest | task_service_pb2.DeleteTasksRequest,
    allowed: frozenset[int],
) -> tuple[list[uuid.UUID], DeadFilter | None, int]:
    """A bulk call's target: its ids, or its filter, and its max_tasks; INVALID_ARGUMENT
    unless exactly one of ids and filter is given."""
    out: list[FieldViolation] = []
    tenant = context.current().tenant
    has_filter = request.HasField("filter")
    if bool(request.ids) == has_filter:
        out.append(
            FieldViolation(
                "ids",
                "give either ids or a filter (set filter, even empty, to take every dead task)",
            )
        )
    ids = _ids(request.ids, out)
    flt = dead_filter(tenant, request.filter, allowed, out) if has_filter else None
    if not 0 <= request.max_tasks <= MAX_MAX_TASKS:
        out.append(FieldViolation("max_tasks", f"must be between 0 and {MAX_MAX_TASKS}"))
    if out:
        raise InvalidArgument(out)
    return ids, flt, request.max_tasks or DEFAULT_MAX_TASKS


class QueueOps:
    """The queue and dead-letter methods (see the module docstring)."""

    def __init__(self, deps: Deps, dispatcher: Dispatcher) -> None:
        self._deps = deps
        self._dispatcher = dispatcher
        self._pauses = dispatcher.policy.pauses

    # -- pause and resume ------------------------------------------------------------

    async def pause(
        self, request: task_service_pb2.PauseQueueRequest
    ) -> task_service_pb2.PauseQueueResponse:
        queue = await self._set_paused(request.queue, True)
        return task_service_pb2.PauseQueueResponse(queue=queue)

    async def resume(
        self, request: task_service_pb2.ResumeQueueRequest
    ) -> task_service_pb2.ResumeQueueResponse:
        queue = await self._set_paused(request.queue, False)
        return task_service_pb2.ResumeQueueResponse(queue=queue)

    async def _set_paused(self, queue: str, paused: bool) -> task_pb2.QueueStats:
        out: list[FieldViolation] = []
        check_name(queue, "queue", out, required=True)
        if out:
            raise InvalidArgument(out)
        tenant = context.current().tenant
        async with self._deps.db.write() as conn:
            await queue_store.set_paused(conn, tenant, queue, paused, self._deps.office.fence())
        self._pauses.set(tenant, queue, paused)
        if paused:
            await self._settle()
        else:
            self._dispatcher.wake()
        (stats,) = await self.queue_stats(tenant, only=queue)
        return stats

    async def _settle(self) -> None:
        """Waits for the dispatch round under way (it may have begun before the pause)
        to end, so that no task of the queue is leased once PauseQueue returns."""
        dispatcher = self._dispatcher
        if not dispatcher.running:
            return
        done = dispatcher.steps
        dispatcher.wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await dispatcher.wait_until(lambda d: d.steps > done)

    # -- ListQueues ---------------------------------------------------------------------

    async def list_queues(
        self,
        request: task_service_pb2.ListQueuesRequest,
        rate_limits: RateLimitService,
        breakers: Breakers,
    ) -> task_service_pb2.ListQueuesResponse:
        """ListQueues, on any coordinator. Per field: the counts, the oldest pending task,
        pauses and rate limits (their tokens as the leader last wrote them back) are read
        from PostgreSQL; circuit breakers from the leader's memory on the leader and from
        the table it writes them to once a second elsewhere; the workers only on the
        leader (``with_workers`` sends the call there, NOT_LEADER from a follower), and a
        follower's answer says it left them out (``workers_omitted``)."""
        if not 0 <= request.count_limit <= MAX_COUNT_LIMIT:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "count_limit",
                        f"must be between 1 and {MAX_COUNT_LIMIT:,} (0 for the default, "
                        f"{DEFAULT_COUNT_LIMIT:,}); got {request.count_limit}",
                    )
                ]
            )
        office = self._deps.office
        leader = office.is_leader()
        if request.with_workers and not leader:
            raise NotLeader(office.leader_address())
        tenant = context.current().tenant
        queues = await self.queue_stats(
            tenant, with_workers=leader, cap=request.count_limit or None
        )
        limits = await rate_limits.of_tenant()
        if limits:
            for queue in queues:
                queue.rate_limits.extend(of_queue(limits, queue.name))
        if leader:
            shown = [
                task_pb2.CircuitBreaker(
                    type=b.type,
                    state=_BREAKER_STATES[b.state],
                    opened_time=convert.maybe_timestamp(b.opened_wall),
                )
                for b in breakers.of_tenant(tenant)
            ]
        elif breakers.enabled:
            async with self._deps.db.read() as conn:
                rows = await breaker_store.of_tenant(conn, tenant)
            shown = [
                task_pb2.CircuitBreaker(
                    type=r["type"],
                    state=_BREAKER_STATES.get(
                        r["state"], task_pb2.CIRCUIT_BREAKER_STATE_UNSPECIFIED
                    ),
                    opened_time=convert.maybe_timestamp(r["opened_time"]),
                )
                for r in rows
            ]
        else:
            shown = []
        return task_service_pb2.ListQueuesResponse(
            queues=queues, circuit_breakers=shown, workers_omitted=not leader
        )

    async def queue_stats(
        self,
        tenant: str,
        *,
        with_workers: bool = True,
        cap: int | None = None,
        only: str | None = None,
    ) -> list[task_pb2.QueueStats]:
        """The tenant's queues (those with tasks, paused ones, and, ``with_workers``, those
        its workers serve), by name, each count exact up to ``cap`` (None: the default,
        :data:`DEFAULT_COUNT_LIMIT`) and flagged beyond it; with ``only``, that one queue,
        whatever it holds. Without ``with_workers`` (a follower: the sessions are the
        leader's) every ``workers`` is 0."""
        async with self._deps.db.read() as conn:
            rows = await store.queue_stats(conn, tenant, cap or DEFAULT_COUNT_LIMIT, only)
            paused = await queue_store.paused_of(conn, tenant)
        if only is not None:
            paused &= {only}
        sessions = list(self._deps.sessions) if with_workers else []

        def workers(queue: str) -> int:
            return sum(1 for s in sessions if dispatch_policy.takes_from(s, tenant, queue))

        found = {
            r.queue: task_pb2.QueueStats(
                name=r.queue,
                pending=r.pending,
                scheduled=r.scheduled,
                running=r.running,
                dead=r.dead,
                pending_capped=r.pending_capped,
                scheduled_capped=r.scheduled_capped,
                dead_capped=r.dead_capped,
                workers=workers(r.queue),
                oldest_pending_time=convert.maybe_timestamp(r.oldest_pending),
                paused=r.queue in paused,
            )
            for r in rows
        }
        for queue in paused - found.keys():
            found[queue] = task_pb2.QueueStats(name=queue, workers=workers(queue), paused=True)
        # A queue only idle workers serve is listed too: where the workers are is news.
        served = {q for s in sessions if s.tenant == tenant for q in s.queues}
        if only is not None:
            served &= {only}
        for queue in served - found.keys():
            found[queue] = task_pb2.QueueStats(name=queue, workers=workers(queue))
        return [found[name] for name in sorted(found)]

    # -- the dead-letter queue ----------------------------------------------------------

    async def list_dead(
        self, request: task_service_pb2.ListDeadTasksRequest
    ) -> task_service_pb2.ListDeadTasksResponse:
        out: list[FieldViolation] = []
        flt = dead_filter(context.current().tenant, request.filter, _FINISHED_STATES, out)
        size = check_page_size(request.page_size, out)
        after: uuid.UUID | None = None
        if request.page_token:
            after = parse_task_id(request.page_token)
            if after is None:
                out.append(
                    FieldViolation("page_token", "is not a token from a previous ListDeadTasks")
                )
        if out:
            raise InvalidArgument(out)
        async with self._deps.db.read() as conn:
            rows = await store.list_dead(conn, flt, after, pages.limit(size))
        rows, token = pages.page(rows, size, lambda last: str(last["id"]))
        return task_service_pb2.ListDeadTasksResponse(
            tasks=[convert.task_from_row(r) for r in rows], next_page_token=token
        )

    async def dead_groups(
        self, request: task_service_pb2.ListDeadTaskGroupsRequest
    ) -> task_service_pb2.ListDeadTaskGroupsResponse:
        out: list[FieldViolation] = []
        flt = dead_filter(context.current().tenant, request.filter, _FINISHED_STATES, out)
        size = check_page_size(request.page_size, out)
        if out:
            raise InvalidArgument(out)
        async with self._deps.db.read() as conn:
            rows = await store.dead_groups(conn, flt, min(size, MAX_PAGE_SIZE) + 1)
        return task_service_pb2.ListDeadTaskGroupsResponse(
            groups=[
                task_service_pb2.DeadTaskGroup(
                    type=r["type"],
                    fingerprint=r["fingerprint"],
                    count=r["n"],
                    first_seen=convert.maybe_timestamp(r["first_seen"]),
                    last_seen=convert.maybe_timestamp(r["last_seen"]),
                    queues=r["queues"],
                )
                for r in rows[:size]
            ],
            truncated=len(rows) > size,
        )

    # -- bulk redrive and delete --------------------------------------------------------

    async def retry_many(
        self, request: task_service_pb2.RetryTasksRequest
    ) -> task_service_pb2.RetryTasksResponse:
        ids, flt, max_tasks = _bulk(request, _RETRY_STATES)
        tenant = context.current().tenant
        deps = self._deps
        if flt is None:
            async with deps.db.write() as conn:
                changed = await store.redrive_ids(conn, tenant, ids, deps.office.fence())
                found = await store.existing(conn, tenant, ids)
            deps.after_commit.publish(Cause.REDRIVEN, changed)
            retried = {r["id"] for r in changed}
            skipped, missing = _leftovers(request.ids, ids, found, retried)
            return task_service_pb2.RetryTasksResponse(
                retried=len(retried), skipped_ids=skipped, not_found_ids=missing
            )
        matching = flt

        async def batch(limit: int) -> int:
            async with deps.db.autocommit() as conn:
                changed = await store.redrive_matching(conn, matching, limit, deps.office.fence())
            deps.after_commit.publish(Cause.REDRIVEN, changed)
            return len(changed)

        total, more = await _in_batches(max_tasks, batch)
        return task_service_pb2.RetryTasksResponse(retried=total, more=more)

    async def delete_many(
        self, request: task_service_pb2.DeleteTasksRequest
    ) -> task_service_pb2.DeleteTasksResponse:
        ids, flt, max_tasks = _bulk(request, _FINISHED_STATES)
        tenant = context.current().tenant
        deps = self._deps
        if flt is None:
            async with deps.db.write() as conn:
                deleted = await store.delete_ids(conn, tenant, ids)
                found = await store.existing(conn, tenant, ids)
            deps.metrics.count_purged({tenant: len(deleted)}, "purge")
            skipped, missing = _leftovers(request.ids, ids, found | deleted, deleted)
            return task_service_pb2.DeleteTasksResponse(
                deleted=len(deleted), skipped_ids=skipped, not_found_ids=missing
            )
        matching = flt

        async def batch(limit: int) -> int:
            async with deps.db.autocommit() as conn:
                count = await store.delete_matching(conn, matching, limit)
            deps.metrics.count_purged({tenant: count}, "purge")
            return count

        total, more = await _in_batches(max_tasks, batch)
        return task_service_pb2.DeleteTasksResponse(deleted=total, more=more)


async def _in_batches(max_tasks: int, batch: Callable[[int], Awaitable[int]]) -> tuple[int, bool]:
    """Runs ``batch(limit)`` (one statement, its own transaction: how many it took) until
    it takes fewer than asked or ``max_tasks`` are done; the total, and whether more may
    match (the last batch was full)."""
    total, more = 0, True
    while more and total < max_tasks:
        want = min(BATCH, max_tasks - total)
        done = await batch(want)
        total += done
        more = done == want
    return total, more


def _leftovers(
    given: Sequence[str], ids: Sequence[uuid.UUID], found: set[str], done: set[str]
) -> tuple[list[str], list[str]]:
    """Of the ids as given: those found but not acted on, and those not found."""
    skipped: list[str] = []
    missing: list[str] = []
    for text, task_id in zip(given, ids, strict=True):
        key = str(task_id)
        if key not in found:
            missing.append(text)
        elif key not in done:
            skipped.append(text)
    return skipped, missing
