"""The blocking client: a thin shell over :class:`AsyncClient`.

It owns a private event loop running in a daemon thread and hands every call to the
:class:`AsyncClient` living on that loop, so conversions, failover, error mapping and
waiting exist once, in the async implementation. Blocking callers may come from any
thread, including threads that run an event loop of their own.

The methods below the marker line are generated from ``AsyncClient`` by
``python -m conveyor.client._codegen`` (same signatures, defaults and docstrings); a test
fails when they are stale.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack

from opentelemetry import trace

from conveyor.client._async_client import AsyncClient
from conveyor.client._locks import SyncLock
from conveyor.client._models import (
    UNSET,
    BulkResult,
    CatchUpPolicy,
    CircuitBreaker,
    DeadTaskGroup,
    OverlapPolicy,
    Page,
    QueueStats,
    RateLimit,
    Schedule,
    Task,
    TaskAttempt,
    TaskOptions,
    TaskSpec,
    TaskState,
    WorkerInfo,
)
from conveyor.transport import ConnectionOptions
from conveyor.transport._encryption import PayloadCodec

__all__ = ["Client"]

T = TypeVar("T")

_DONE = object()


class _LoopThread:
    """An event loop running forever in a daemon thread, and a way to run coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Daemon: a client the application forgot to close must not keep the process alive.
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the sync Conveyor client cannot be called from its own loop")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the Conveyor client is closed; create a new one")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt and friends land here while the call still runs on the
            # loop; cancel it there instead of leaving it orphaned.
            future.cancel()
            raise

    def iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        async def step() -> Any:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                # A sentinel, because StopAsyncIteration does not travel well through
                # concurrent futures.
                return _DONE

        try:
            while True:
                item = self.run(step())
                if item is _DONE:
                    return
                yield item
        finally:
            if not self.loop.is_closed():
                self.run(agen.aclose())

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        # Finalise abandoned watch()/iter_tasks() generators on the loop itself: the
        # calling thread may be running a loop of its own, where run_until_complete fails.
        try:
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


class Client:
    """Blocking client for a Conveyor cluster; the twin of :class:`AsyncClient`.

    Use as ``with Client("10.0.0.1:50051") as client: ...`` or call :meth:`close`.
    Thread-safe. The constructor's arguments and the methods are those of
    :class:`AsyncClient` (see there); ``watch`` and ``iter_tasks`` return iterators. A
    call runs in a copy of the caller's context, so a submit made inside a span joins
    that span's trace.
    """

    def __init__(
        self,
        coordinators: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float | None = 10.0,
        api_key: str | None = None,
        options: ConnectionOptions | None = None,
        retry_submits: bool = True,
        retry_resource_exhausted: bool | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        codec: PayloadCodec | None = None,
    ) -> None:
        # Built before the thread starts, so bad arguments raise here and leak no thread.
        self._async = AsyncClient(
            coordinators,
            timeout=timeout,
            api_key=api_key,
            options=options,
            retry_submits=retry_submits,
            retry_resource_exhausted=retry_resource_exhausted,
            tracer_provider=tracer_provider,
            codec=codec,
        )
        self._loop = _LoopThread()
        self._close_lock = threading.Lock()

    @property
    def addresses(self) -> builtins.list[str]:
        """The configured coordinator addresses, in failover order."""
        return self._async.addresses

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections and stops the background thread. Idempotent."""
        with self._close_lock:
            if self._loop.loop.is_closed():
                return
            try:
                self._loop.run(self._async.close())
            finally:
                self._loop.stop()

    def lock(
        self, name: str, ttl: float, *, timeout: float | None = None, renew: bool = True
    ) -> SyncLock:
        """A named lock with a fencing token: ``async with client.lock("nightly", 30) as lk``
        (``with`` on the blocking client).

        The block runs once the lock is taken (waiting up to ``timeout`` seconds for its
        holder, then :class:`TimeoutError`); ``lk.fencing_token`` is larger than that of
        every earlier holder of the name. A lock alone does not give mutual exclusion: a
        holder paused past ``ttl`` (renewed every ``ttl / 3`` while the block runs) still
        runs while another holds the lock, so pass the token with every write and have
        the resource refuse a smaller one than it has seen (see :class:`Lock`). Locks
        are per tenant; the API key needs the ``worker`` scope.
        """
        return SyncLock(self._async.lock(name, ttl, timeout=timeout, renew=renew), self._loop.run)

    # -- generated from AsyncClient by `python -m conveyor.client._codegen`; do not edit below --
    def submit(
        self,
        type: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        run_at: datetime | timedelta | None = None,
        traceparent: str | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        deadline: datetime | timedelta | None = None,
        after: Iterable[str | Task] = (),
        on_dependency_failure: Literal["cancel", "run"] = "cancel",
        **task: Unpack[TaskOptions],
    ) -> Task:
        """Submits one task and returns it as committed.

        Args:
            type: The task type, the name a worker registered a handler under.
            payload: Anything ``json.dumps`` accepts; bytes are sent as-is
                (``application/octet-stream``), as is any payload with ``raw=True``.
            idempotency_key: Makes resubmitting safe, also from another process or
                much later: the same key returns the first task. (The client's own resends
                are safe without one: see ``retry_submits``.)
            run_at: Earliest start: an aware datetime or a delay from now.
            traceparent: W3C trace context linking the execution to the caller's trace;
                by default, with tracing set up, the current span's (see the class).
            concurrency_key: At most ``concurrency_limit`` (1) tasks with this key run at
                once, cluster-wide; the others wait without holding back other keys.
            concurrency_limit: How many tasks of ``concurrency_key`` may run at once.
            deadline: The latest start (an aware datetime or a delay from now); a task not
                started by then ends DEAD with ``DEADLINE_EXCEEDED``, without running.
            after: Tasks (ids or :class:`Task` values, of this tenant) that must all
                finish first: the task waits BLOCKED until then. A small DAG in one call:
                ``submit_many()`` with ``ref`` and ``after_refs``.
            on_dependency_failure: When a task of ``after`` ends DEAD or CANCELLED:
                ``"cancel"`` this one too (its ``last_error`` names the dependency), or
                ``"run"`` it anyway.
            task: How it runs (:class:`TaskOptions`): ``queue`` (``"default"``),
                ``priority`` (-1000 to 1000), ``max_attempts`` (3), ``timeout`` (of one
                attempt, 5 min), ``retry_policy``, ``labels``, ``raw`` (send bytes as-is),
                ``content_type``.

        Raises:
            InvalidArgumentError: A field is invalid (see ``field_violations``).
            IdempotencyConflictError: The key is taken by a different request.
            TaskNotFoundError: A task of ``after`` does not exist (or is another tenant's).
        """
        return self._loop.run(
            self._async.submit(
                type,
                payload,
                idempotency_key=idempotency_key,
                run_at=run_at,
                traceparent=traceparent,
                concurrency_key=concurrency_key,
                concurrency_limit=concurrency_limit,
                deadline=deadline,
                after=after,
                on_dependency_failure=on_dependency_failure,
                **task,
            )
        )

    def submit_many(self, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> builtins.list[Task]:
        """Submits many tasks in as few calls as possible; returns them in input order.

        Each element is a :class:`TaskSpec` or a dict of :meth:`submit` keyword arguments
        (``{"type": "email", "payload": {...}}``). Tasks go in batches of up to 1000
        (fewer when payloads are large); each batch is atomic, the whole call is not: when
        a batch fails, the batches before it stay submitted (the error says how many).
        Each task gets a request id, as in :meth:`submit`. With tracing set up, one
        ``submit`` span covers the call, and tasks without a ``traceparent`` of their own
        carry its context.

        A small DAG goes in one call: give tasks a ``ref`` and list, in another task's
        ``after_refs``, the refs it waits for (the batch is refused if they make a
        cycle); every task of such a call must fit in one batch (1000 tasks). A resend
        of the same call returns the same tasks.
        """
        return self._loop.run(self._async.submit_many(tasks))

    def get(self, task_id: str) -> Task:
        """Returns the task's current state.

        Raises:
            TaskNotFoundError: No task has this id.
        """
        return self._loop.run(self._async.get(task_id))

    def get_with_attempts(self, task_id: str) -> tuple[Task, builtins.list[TaskAttempt]]:
        """Returns the task and every attempt so far, oldest first."""
        return self._loop.run(self._async.get_with_attempts(task_id))

    def list(
        self,
        queue: str | None = None,
        state: TaskState | str | None = None,
        type: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> Page[Task]:
        """Returns one page of tasks, newest first, optionally filtered.

        Args:
            queue: Only tasks on this queue.
            state: Only tasks in this state (a :class:`TaskState` or its name).
            type: Only tasks of this type.
            page_size: At most 1000.
            page_token: ``next_page_token`` of the previous page.
            labels: Only tasks carrying each of these labels with its value.
            created_after: Only tasks created at or after this time.
            created_before: Only tasks created before this time.
        """
        return self._loop.run(
            self._async.list(
                queue,
                state,
                type,
                page_size,
                page_token,
                labels=labels,
                created_after=created_after,
                created_before=created_before,
            )
        )

    def iter_tasks(
        self,
        queue: str | None = None,
        state: TaskState | str | None = None,
        type: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Yields every matching task, newest first, fetching pages as it goes."""
        return self._loop.iterate(self._async.iter_tasks(queue, state, type, page_size))

    def queues(self, *, count_limit: int = 0) -> builtins.list[QueueStats]:
        """Returns every queue with its task counts by state. Each count but ``running``
        is exact up to ``count_limit`` (0: the server's default, 10,000; at most
        1,000,000) and capped beyond it, flagged ``pending_capped`` and the like: the
        call's cost stays bounded however deep a queue is."""
        return self._loop.run(self._async.queues(count_limit=count_limit))

    def circuit_breakers(self) -> builtins.list[CircuitBreaker]:
        """Returns this tenant's circuit breakers that are not closed (the task types the
        leader holds back after too many failures)."""
        return self._loop.run(self._async.circuit_breakers())

    def set_rate_limit(
        self,
        *,
        rate: float,
        queue: str = "",
        type: str = "",
        burst: int = 0,
        all_tenants: bool = False,
    ) -> RateLimit:
        """Sets (creates or replaces) the rate limit of a queue, a type or both ("" for
        every one): their tasks start at most ``rate`` a second, ``burst`` at once (0: one
        second's worth). ``all_tenants`` (admin keys only) limits every tenant together."""
        return self._loop.run(
            self._async.set_rate_limit(
                rate=rate, queue=queue, type=type, burst=burst, all_tenants=all_tenants
            )
        )

    def rate_limits(self) -> builtins.list[RateLimit]:
        """Returns the rate limits that apply to this tenant: its own, then all tenants'."""
        return self._loop.run(self._async.rate_limits())

    def delete_rate_limit(
        self, *, queue: str = "", type: str = "", all_tenants: bool = False
    ) -> None:
        """Deletes a rate limit.

        Raises:
            RPCError: NOT_FOUND when there is no such limit.
        """
        self._loop.run(
            self._async.delete_rate_limit(queue=queue, type=type, all_tenants=all_tenants)
        )

    def workers(self) -> builtins.list[WorkerInfo]:
        """Returns the workers connected to the leader: the key's tenant's, or every
        tenant's for an admin key."""
        return self._loop.run(self._async.workers())

    def cancel(self, task_id: str) -> Task:
        """Cancels an unfinished task (a running one's worker is told to stop).

        Raises:
            InvalidStateError: The task has already finished.
        """
        return self._loop.run(self._async.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        """Redrives a DEAD or CANCELLED task: it becomes PENDING with a fresh set of
        attempts.

        Raises:
            InvalidStateError: The task is neither DEAD nor CANCELLED.
        """
        return self._loop.run(self._async.retry(task_id))

    def update(
        self,
        task_id: str,
        *,
        etag: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Task:
        """Changes a task that has not started (PENDING or SCHEDULED, no attempt counted);
        arguments left ``None`` keep their value. ``labels`` replaces all of them. A
        ``run_at`` in the future makes the task SCHEDULED, one now or past PENDING.

        With ``etag`` (``Task.etag`` of a read), the change applies only if the task did
        not change since: of concurrent updates with one etag, exactly one wins.

        Raises:
            EtagMismatchError: The task changed since it was read (``etag`` is stale).
            InvalidStateError: The task has started (or finished).
        """
        return self._loop.run(
            self._async.update(
                task_id,
                etag=etag,
                priority=priority,
                run_at=run_at,
                max_attempts=max_attempts,
                labels=labels,
            )
        )

    def pause_queue(self, queue: str) -> QueueStats:
        """Pauses a queue: it accepts submits and dispatches nothing (running tasks
        finish) until :meth:`resume_queue`. Once this returns, no task of it is leased.
        Pausing a paused queue changes nothing."""
        return self._loop.run(self._async.pause_queue(queue))

    def resume_queue(self, queue: str) -> QueueStats:
        """Dispatches a paused queue again (a queue not paused is left as it is)."""
        return self._loop.run(self._async.resume_queue(queue))

    def list_dead(
        self,
        *,
        queue: str | None = None,
        type: str | None = None,
        fingerprint: str | None = None,
        finished_after: datetime | None = None,
        finished_before: datetime | None = None,
        states: Iterable[TaskState | str] | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> Page[Task]:
        """Returns one page of the dead-letter queue, newest first.

        Args:
            queue: Only tasks on this queue.
            type: Only tasks of this type.
            fingerprint: Only tasks whose last error's first line is this (as
                :meth:`dead_groups` shows it).
            finished_after: Only tasks that finished at or after this time.
            finished_before: Only tasks that finished before this time.
            states: The finished states to list: ``DEAD`` by default, also
                ``CANCELLED`` or ``SUCCEEDED``.
            page_size: At most 1000.
            page_token: ``next_page_token`` of the previous page.
        """
        return self._loop.run(
            self._async.list_dead(
                queue=queue,
                type=type,
                fingerprint=fingerprint,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
                page_size=page_size,
                page_token=page_token,
            )
        )

    def dead_groups(
        self,
        *,
        queue: str | None = None,
        type: str | None = None,
        finished_after: datetime | None = None,
        finished_before: datetime | None = None,
        states: Iterable[TaskState | str] | None = None,
        limit: int = 100,
    ) -> builtins.list[DeadTaskGroup]:
        """Returns the dead-letter queue grouped by task type and error fingerprint,
        largest group first (at most ``limit`` groups, up to 1000)."""
        return self._loop.run(
            self._async.dead_groups(
                queue=queue,
                type=type,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
                limit=limit,
            )
        )

    def retry_tasks(
        self,
        ids: Sequence[str] | None = None,
        *,
        queue: str | None = None,
        type: str | None = None,
        fingerprint: str | None = None,
        finished_after: datetime | None = None,
        finished_before: datetime | None = None,
        states: Iterable[TaskState | str] | None = None,
        max_tasks: int = 0,
    ) -> BulkResult:
        """Redrives dead (and cancelled) tasks: each becomes PENDING with a fresh set of
        attempts. By ``ids`` (at most 1000), or else every task the filter arguments
        match (``states``: ``DEAD`` by default, ``CANCELLED`` too if named), at most
        ``max_tasks`` (10000 by default) per call: call again while ``more``. A task no
        longer dead or cancelled is left alone, so a repeated call redrives nothing twice.

        Raises:
            InvalidArgumentError: Both ids and filter arguments, or a bad filter.
        """
        return self._loop.run(
            self._async.retry_tasks(
                ids,
                queue=queue,
                type=type,
                fingerprint=fingerprint,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
                max_tasks=max_tasks,
            )
        )

    def delete_tasks(
        self,
        ids: Sequence[str] | None = None,
        *,
        queue: str | None = None,
        type: str | None = None,
        fingerprint: str | None = None,
        finished_after: datetime | None = None,
        finished_before: datetime | None = None,
        states: Iterable[TaskState | str] | None = None,
        max_tasks: int = 0,
    ) -> BulkResult:
        """Deletes finished tasks and their attempts: by ``ids`` (at most 1000), or else
        every task the filter arguments match (``states``: ``DEAD`` by default, also
        ``CANCELLED`` and ``SUCCEEDED``), at most ``max_tasks`` (10000 by default) per
        call. Unfinished tasks are never deleted (they are listed in ``skipped_ids``).

        Raises:
            InvalidArgumentError: Both ids and filter arguments, or a bad filter.
        """
        return self._loop.run(
            self._async.delete_tasks(
                ids,
                queue=queue,
                type=type,
                fingerprint=fingerprint,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
                max_tasks=max_tasks,
            )
        )

    def watch(self, task_id: str) -> Iterator[Task]:
        """Yields the task's current state, then each change, until it is terminal.

        A broken stream is reopened by itself (after re-reading the task, so a change
        made while disconnected is not missed); it gives up with :class:`UnavailableError`
        only after about a minute without any coordinator answering. Intermediate
        states may be skipped while disconnected; the terminal state never is.
        """
        return self._loop.iterate(self._async.watch(task_id))

    def wait(self, task_id: str, timeout: float | timedelta | None = None) -> Task:
        """Waits until the task is terminal (SUCCEEDED, DEAD or CANCELLED) and returns it.

        When the coordinator says that no connected worker serves the task (its type on
        its queue), a warning is logged once (logger ``conveyor.client``) and the
        timeout's error says so too.

        Args:
            timeout: Seconds (or a timedelta) to wait at most; ``None`` waits for good.

        Raises:
            WaitTimeoutError: The timeout passed first; the task keeps running.
        """
        return self._loop.run(self._async.wait(task_id, timeout))

    def result(self, task_id: str, timeout: float | timedelta | None = None) -> Any:
        """Waits for the task and returns its result decoded from JSON.

        Raises:
            TaskFailedError: The task ended DEAD (``last_error`` says why).
            TaskCancelledError: The task was cancelled.
            WaitTimeoutError: The timeout passed first.
            DecryptionError: The result is encrypted and this client's codec cannot
                open it (a key not in its ring, say).
        """
        return self._loop.run(self._async.result(task_id, timeout))

    def create_schedule(
        self,
        name: str,
        cron: str,
        type: str,
        payload: Any = None,
        *,
        time_zone: str = "UTC",
        overlap_policy: OverlapPolicy | str | None = None,
        catch_up_policy: CatchUpPolicy | str | None = None,
        catch_up_limit: int | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        paused: bool = False,
        **task: Unpack[TaskOptions],
    ) -> Schedule:
        """Creates a schedule that submits a task at every tick of ``cron``.

        Args:
            name: Unique per tenant (letters, digits, ``_ . : - /``).
            cron: 5 fields (``"*/5 * * * *"``), 6 with seconds first (``"*/10 * * * * *"``)
                or an alias such as ``"@hourly"``.
            type, payload, task: The task each tick submits, as for :meth:`submit`
                (:class:`TaskOptions`).
            time_zone: IANA zone the expression is read in (DST: a skipped wall time does
                not fire, a repeated one fires once).
            overlap_policy: ``ALLOW`` (default), ``SKIP`` or ``BUFFER_ONE`` while the
                previous firing is unfinished.
            catch_up_policy: For ticks missed while no coordinator ran: ``SKIP``,
                ``FIRE_ONCE`` (default) or ``FIRE_ALL`` (up to ``catch_up_limit``, 100).
            start_time, end_time: No ticks before ``start_time`` or from ``end_time`` on.
            paused: Create it paused.

        Raises:
            InvalidArgumentError: A field is invalid (cron, time zone, template, ...).
            RPCError: ``ALREADY_EXISTS`` (reason ``SCHEDULE_ALREADY_EXISTS``): the name is taken.
        """
        return self._loop.run(
            self._async.create_schedule(
                name,
                cron,
                type,
                payload,
                time_zone=time_zone,
                overlap_policy=overlap_policy,
                catch_up_policy=catch_up_policy,
                catch_up_limit=catch_up_limit,
                start_time=start_time,
                end_time=end_time,
                paused=paused,
                **task,
            )
        )

    def get_schedule(self, name: str) -> Schedule:
        """Returns the schedule with its next fire times and latest firings.

        Raises:
            RPCError: ``NOT_FOUND`` (reason ``SCHEDULE_NOT_FOUND``).
        """
        return self._loop.run(self._async.get_schedule(name))

    def list_schedules(self, page_size: int = 100, page_token: str | None = None) -> Page[Schedule]:
        """Returns one page of schedules, by name."""
        return self._loop.run(self._async.list_schedules(page_size, page_token))

    def update_schedule(
        self,
        name: str,
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        type: str | None = None,
        payload: Any = UNSET,
        overlap_policy: OverlapPolicy | str | None = None,
        catch_up_policy: CatchUpPolicy | str | None = None,
        catch_up_limit: int | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        etag: str | None = None,
        **task: Unpack[TaskOptions],
    ) -> Schedule:
        """Changes the given fields of a schedule (the others stay as they are).

        Changing ``cron``, ``time_zone``, ``start_time`` or ``end_time`` restarts the
        schedule from now. With ``etag`` (from a read), the update applies only if nobody
        changed the schedule since (else ``RPCError`` with code ``ABORTED``). The task's
        fields (``type``, ``payload``, :class:`TaskOptions`) change only where given; a
        new ``payload`` is encoded as for :meth:`submit` (``raw``).
        """
        return self._loop.run(
            self._async.update_schedule(
                name,
                cron=cron,
                time_zone=time_zone,
                type=type,
                payload=payload,
                overlap_policy=overlap_policy,
                catch_up_policy=catch_up_policy,
                catch_up_limit=catch_up_limit,
                start_time=start_time,
                end_time=end_time,
                etag=etag,
                **task,
            )
        )

    def delete_schedule(self, name: str) -> None:
        """Deletes a schedule; the tasks it submitted stay."""
        self._loop.run(self._async.delete_schedule(name))

    def pause_schedule(self, name: str) -> Schedule:
        """Stops a schedule firing (pausing a paused one changes nothing)."""
        return self._loop.run(self._async.pause_schedule(name))

    def resume_schedule(self, name: str) -> Schedule:
        """Starts a paused schedule again from now; ticks missed while paused do not fire."""
        return self._loop.run(self._async.resume_schedule(name))
