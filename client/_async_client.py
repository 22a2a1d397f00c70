"""The asyncio client: every operation the client offers is implemented here, once."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self, Unpack

import grpc
import uuid_utils
from opentelemetry import trace

from conveyor.client._channel import AdminMethod, Connection, RetryRules, StubMethod
from conveyor.client._encryption import (
    open_schedule,
    open_submitted,
    open_task,
    require_result,
    seal_requests,
    seal_template,
)
from conveyor.client._errors import TaskCancelledError, TaskFailedError, WaitTimeoutError
from conveyor.client._locks import Lock
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
    TaskTemplate,
    WorkerInfo,
    _timestamp,
    catch_up_to_proto,
    dead_filter,
    overlap_to_proto,
    state_to_proto,
    task_spec,
)
from conveyor.observability.tracing import Tracing
from conveyor.transport import Backoff, ConnectionOptions, parse_addresses
from conveyor.transport._encryption import EncryptionError, PayloadCodec
from conveyor.transport._errors import InvalidArgumentError, RPCError, UnavailableError
from conveyor.v1 import schedule_pb2 as spb
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb

__all__ = ["AsyncClient"]

logger = logging.getLogger("conveyor.client")

# The coordinator accepts at most this many tasks per SubmitTasks call.
MAX_BATCH = 1000
# And gRPC servers refuse messages over 4 MiB unless configured otherwise, so batches of
# large payloads are cut by size too, with room to spare for framing.
_MAX_BATCH_BYTES = 3 * 1024 * 1024
# Consecutive broken watch streams tolerated before watch() gives up (with the failover
# inside each attempt, about a minute); the count resets when the task changes state or
# a stream stayed up for _WATCH_HEALTHY_AFTER seconds.
_MAX_WATCH_FAILURES = 10
_WATCH_BACKOFF = Backoff(initial=0.1, maximum=5.0)
_WATCH_HEALTHY_AFTER = 30.0


class AsyncClient:
    """Asyncio client for a Conveyor cluster.

    Use as ``async with AsyncClient("10.0.0.1:50051,10.0.0.2:50051") as client: ...``
    or call :meth:`close` when done. Safe to share between tasks of one event loop.

    Args:
        coordinators: One ``"host:port"``, several separated by commas, or a sequence of
            them. They are tried in order; the client follows leader redirects by itself.
        timeout: Seconds each call may take, retries and failover included; ``None`` for
            no limit. Does not apply to ``watch()`` once its stream is open, nor to
            ``wait()``, which take their own.
        api_key: Sent as ``authorization: Bearer <api_key>`` with every call (a shortcut
            for ``options=ConnectionOptions(api_key=...)``).
        options: Transport settings: TLS credentials, metadata, message limits,
            keepalive, client interceptors.
        retry_submits: Resend a submit whose outcome is unknown (the connection broke
            after it was sent, or the coordinator answered ``OUTCOME_UNKNOWN``). To make
            that safe, every task is sent with a ``request_id`` the client makes (a UUIDv7
            that becomes the task's id), so a resend returns the task already written
            instead of a second one; it costs the coordinator nothing. With ``False`` the
            coordinator makes the ids (unless a ``codec`` needs them: an encrypted
            payload is bound to its task's id), and such a failure raises unless the
            submit has an ``idempotency_key``: the task may or may not exist.
        retry_resource_exhausted: Resend calls refused with ``RESOURCE_EXHAUSTED``
            (``OverloadedError``, ``QuotaExceededError``: nothing was written) after the
            wait the server asks for (``RetryInfo``), within ``timeout``. By default
            (``None``) submits do (backpressure: a submit over a backlog or rate limit
            waits its turn, and raises only when ``timeout`` leaves no room for the wait
            or the refusal says waiting will not help) and other calls raise at once;
            ``True``: every call waits; ``False``: none does.
        tracer_provider: The OpenTelemetry tracer provider for the ``submit`` span of
            each submit, whose context the task carries (so its dispatch and execution
            join the trace); by default the global one, once the application sets one
            up. Without any, submits make no span and cost nothing more.
        codec: Encodes the payloads this client submits (tasks and schedule templates)
            and decodes the payloads and results it reads, such as
            ``EncryptionCodec.from_key_file("keys.json")`` for end-to-end encryption: the
            coordinator and its database then hold only ciphertext. Workers need the
            same keys. What a read cannot decode stays as it travelled, and
            :meth:`result` raises :class:`DecryptionError` for it.
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
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        addresses = parse_addresses(coordinators)
        self._conn = Connection(
            addresses,
            timeout=timeout,
            options=ConnectionOptions.merge(options, api_key=api_key, addresses=addresses),
            rules=RetryRules(retry_resource_exhausted=retry_resource_exhausted),
        )
        self._retry_submits = retry_submits
        self._codec = codec
        self._tracer_provider = tracer_provider
        # The Tracing of the provider last seen (the global one may be set up later).
        self._tracing_for: tuple[object, Tracing] = (None, Tracing.disabled())

    def _tracing(self) -> Tracing:
        provider = self._tracer_provider or trace.get_tracer_provider()
        seen, tracing = self._tracing_for
        if provider is not seen:
            tracing = (
                Tracing(provider) if self._tracer_provider is not None else Tracing.from_global()
            )
            self._tracing_for = (provider, tracing)
        return tracing

    @property
    def addresses(self) -> builtins.list[str]:
        """The configured coordinator addresses, in failover order."""
        return list(self._conn.addresses)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connections; calls still in flight are cancelled. Idempotent."""
        await self._conn.close()

    def lock(
        self, name: str, ttl: float, *, timeout: float | None = None, renew: bool = True
    ) -> Lock:
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
        return Lock(self._conn, name, ttl, timeout=timeout, renew=renew)

    # -- submitting --------------------------------------------------------------------

    async def submit(
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
        spec = TaskSpec(
            type=type,
            payload=payload,
            idempotency_key=idempotency_key,
            run_at=run_at,
            traceparent=traceparent,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
            deadline=deadline,
            after=tuple(after),
            on_dependency_failure=on_dependency_failure,
            **task,
        )
        tracing = self._tracing()
        if not tracing.enabled:
            return await self._submit_one(spec.to_proto())
        with tracing.submit_span(type, spec.queue, parent=traceparent or "") as context:
            request = spec.to_proto()
            request.traceparent = context
            return await self._submit_one(request)

    async def _submit_one(self, request: pb.SubmitTaskRequest) -> Task:
        self._add_request_ids([request])
        plain = seal_requests(self._codec, [request])
        response = await self._conn.unary(
            lambda s: s.tasks.SubmitTask,
            request,
            # Without a key or an id, a resend after a broken connection could duplicate.
            idempotent=self._resendable(request),
            submit=True,
        )
        # Decoded when first read (``Task._from_wire``): most callers read the id at most.
        return open_submitted(self._codec, Task._from_wire(response.task), plain, 0)

    def _add_request_ids(self, requests: Iterable[pb.SubmitTaskRequest]) -> None:
        """Gives each task an id of the client's making, unless ``retry_submits`` is off
        and there is no codec (an encrypted payload is bound to its task's id)."""
        if self._retry_submits or self._codec is not None:
            for request in requests:
                if not request.request_id:
                    request.request_id = str(uuid_utils.uuid7())

    def _resendable(self, request: pb.SubmitTaskRequest) -> bool:
        """Whether a resend of ``request`` cannot make a second task (and is wanted)."""
        return bool(request.idempotency_key or (request.request_id and self._retry_submits))

    async def submit_many(
        self, tasks: Iterable[TaskSpec | Mapping[str, Any]]
    ) -> builtins.list[Task]:
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
        call = _requests(tasks)
        requests = call.tasks
        tracing = self._tracing()
        if not tracing.enabled or not requests:
            return await self._submit_batches(call)
        types = {r.type for r in requests}
        queues = {r.queue or "default" for r in requests}
        with tracing.submit_span(
            types.pop() if len(types) == 1 else "tasks",
            queues.pop() if len(queues) == 1 else "",
            count=len(requests),
        ) as context:
            for request in requests:
                request.traceparent = request.traceparent or context
            return await self._submit_batches(call)

    async def _submit_batches(self, call: pb.SubmitTasksRequest) -> builtins.list[Task]:
        """Submits ``call``'s tasks: as it is when they fit in one SubmitTasks call (the
        usual case), else in batches copied out of it."""
        results: list[Task] = []
        requests = call.tasks
        if not requests:
            return results
        # Ids go on before batching: a batch request copies the messages.
        self._add_request_ids(requests)
        plain = seal_requests(self._codec, requests)
        batches: Iterable[pb.SubmitTasksRequest]
        if len(requests) <= MAX_BATCH and call.ByteSize() <= _MAX_BATCH_BYTES:
            # One batch: the message built, not a copy of each task into another one
            # (and one size for all, not one per task; issue 19).
            batches = (call,)
        else:
            batches = (pb.SubmitTasksRequest(tasks=b) for b in _batches(list(requests)))
        for batch in batches:
            try:
                response = await self._conn.unary(
                    lambda s: s.tasks.SubmitTasks,
                    batch,
                    idempotent=all(self._resendable(r) for r in batch.tasks),
                    submit=True,
                )
            except RPCError as err:
                if isinstance(err, InvalidArgumentError):
                    err._shift_task_index(len(results))
                if results:
                    err._append(
                        f"{len(results)} task(s) from earlier batches of this submit_many() "
                        f"call were already submitted and stay submitted."
                    )
                raise
            # Each decoded when first read (``Task._from_wire``): a bulk submit's caller
            # rarely reads them all, and decoding was half the client's CPU per task.
            if self._codec is None:
                results.extend([Task._from_wire(r.task) for r in response.results])
            else:
                results.extend(
                    open_submitted(self._codec, Task._from_wire(r.task), plain, index)
                    for index, r in enumerate(response.results, start=len(results))
                )
        return results

    # -- reading -----------------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        """Returns the task's current state.

        Raises:
            TaskNotFoundError: No task has this id.
        """
        task, _ = await self._get(task_id)
        return task

    async def get_with_attempts(self, task_id: str) -> tuple[Task, builtins.list[TaskAttempt]]:
        """Returns the task and every attempt so far, oldest first."""
        return await self._get(task_id)

    async def _get(self, task_id: str) -> tuple[Task, builtins.list[TaskAttempt]]:
        response = await self._conn.unary(
            lambda s: s.tasks.GetTask, pb.GetTaskRequest(id=task_id), idempotent=True
        )
        task = open_task(self._codec, _task(response))
        return task, [TaskAttempt.from_proto(a) for a in response.attempts]

    async def list(
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
        request = pb.ListTasksRequest(
            queue=queue or "",
            state=state_to_proto(state),  # type: ignore[arg-type]
            type=type or "",
            page_size=page_size,
            page_token=page_token or "",
            labels=dict(labels or {}),
        )
        if created_after is not None:
            request.created_after.CopyFrom(_timestamp(created_after))
        if created_before is not None:
            request.created_before.CopyFrom(_timestamp(created_before))
        response = await self._conn.unary(lambda s: s.tasks.ListTasks, request, idempotent=True)
        return Page(
            items=[open_task(self._codec, Task.from_proto(t)) for t in response.tasks],
            next_page_token=response.next_page_token or None,
        )

    async def iter_tasks(
        self,
        queue: str | None = None,
        state: TaskState | str | None = None,
        type: str | None = None,
        page_size: int = 100,
    ) -> AsyncGenerator[Task, None]:
        """Yields every matching task, newest first, fetching pages as it goes."""
        token: str | None = None
        while True:
            page = await self.list(queue, state, type, page_size=page_size, page_token=token)
            for task in page.items:
                yield task
            if page.next_page_token is None:
                return
            token = page.next_page_token

    async def queues(self, *, count_limit: int = 0) -> builtins.list[QueueStats]:
        """Returns every queue with its task counts by state. Each count but ``running``
        is exact up to ``count_limit`` (0: the server's default, 10,000; at most
        1,000,000) and capped beyond it, flagged ``pending_capped`` and the like: the
        call's cost stays bounded however deep a queue is."""
        # The worker counts are the leader's memory: it answers this one (a follower
        # would leave them out).
        request = pb.ListQueuesRequest(with_workers=True, count_limit=count_limit)
        response = await self._conn.unary(lambda s: s.tasks.ListQueues, request, idempotent=True)
        return [QueueStats.from_proto(q) for q in response.queues]

    async def circuit_breakers(self) -> builtins.list[CircuitBreaker]:
        """Returns this tenant's circuit breakers that are not closed (the task types the
        leader holds back after too many failures)."""
        response = await self._conn.unary(
            lambda s: s.tasks.ListQueues, pb.ListQueuesRequest(), idempotent=True
        )
        return [CircuitBreaker.from_proto(b) for b in response.circuit_breakers]

    async def set_rate_limit(
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
        limit = task_pb2.RateLimit(
            queue=queue, type=type, rate=rate, burst=burst, all_tenants=all_tenants
        )
        response = await self._conn.unary(
            lambda s: s.tasks.SetRateLimit, pb.SetRateLimitRequest(limit=limit), idempotent=True
        )
        return RateLimit.from_proto(response.limit)

    async def rate_limits(self) -> builtins.list[RateLimit]:
        """Returns the rate limits that apply to this tenant: its own, then all tenants'."""
        response = await self._conn.unary(
            lambda s: s.tasks.ListRateLimits, pb.ListRateLimitsRequest(), idempotent=True
        )
        return [RateLimit.from_proto(r) for r in response.limits]

    async def delete_rate_limit(
        self, *, queue: str = "", type: str = "", all_tenants: bool = False
    ) -> None:
        """Deletes a rate limit.

        Raises:
            RPCError: NOT_FOUND when there is no such limit.
        """
        request = pb.DeleteRateLimitRequest(queue=queue, type=type, all_tenants=all_tenants)
        await self._conn.unary(lambda s: s.tasks.DeleteRateLimit, request, idempotent=False)

    async def workers(self) -> builtins.list[WorkerInfo]:
        """Returns the workers connected to the leader: the key's tenant's, or every
        tenant's for an admin key."""
        response = await self._conn.unary(
            lambda s: s.tasks.ListWorkers, pb.ListWorkersRequest(), idempotent=True
        )
        return [WorkerInfo.from_proto(w) for w in response.workers]

    async def _admin_read(self, method: AdminMethod, request: Any) -> Any:
        """One AdminService read with this client's addresses, failover, key and TLS.

        Private: the client does not wrap the AdminService yet; conveyor's console shows
        it through each signed-in user's own client with this.
        """
        return await self._conn.admin_unary(method, request, idempotent=True)

    # -- transitions -------------------------------------------------------------------

    async def cancel(self, task_id: str) -> Task:
        """Cancels an unfinished task (a running one's worker is told to stop).

        Raises:
            InvalidStateError: The task has already finished.
        """
        return await self._task_call(lambda s: s.tasks.CancelTask, pb.CancelTaskRequest(id=task_id))

    async def retry(self, task_id: str) -> Task:
        """Redrives a DEAD or CANCELLED task: it becomes PENDING with a fresh set of
        attempts.

        Raises:
            InvalidStateError: The task is neither DEAD nor CANCELLED.
        """
        return await self._task_call(lambda s: s.tasks.RetryTask, pb.RetryTaskRequest(id=task_id))

    async def update(
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
        request = pb.UpdateTaskRequest(id=task_id, etag=etag or "")
        if priority is not None:
            request.priority = priority
        if max_attempts is not None:
            request.max_attempts = max_attempts
        if run_at is not None:
            request.run_at.FromDatetime(run_at)
        if labels is not None:
            request.update_labels = True
            request.labels.update(labels)
        return await self._task_call(lambda s: s.tasks.UpdateTask, request)

    async def _task_call(self, method: StubMethod, request: Any) -> Task:
        """A transition of one task (cancel, retry: never resent once it may have reached
        the coordinator); the task as it is after it."""
        response = await self._conn.unary(method, request, idempotent=False)
        return open_task(self._codec, Task.from_proto(response.task))

    # -- queue operations --------------------------------------------------------------

    async def pause_queue(self, queue: str) -> QueueStats:
        """Pauses a queue: it accepts submits and dispatches nothing (running tasks
        finish) until :meth:`resume_queue`. Once this returns, no task of it is leased.
        Pausing a paused queue changes nothing."""
        response = await self._conn.unary(
            lambda s: s.tasks.PauseQueue, pb.PauseQueueRequest(queue=queue), idempotent=True
        )
        return QueueStats.from_proto(response.queue)

    async def resume_queue(self, queue: str) -> QueueStats:
        """Dispatches a paused queue again (a queue not paused is left as it is)."""
        response = await self._conn.unary(
            lambda s: s.tasks.ResumeQueue, pb.ResumeQueueRequest(queue=queue), idempotent=True
        )
        return QueueStats.from_proto(response.queue)

    async def list_dead(
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
        request = pb.ListDeadTasksRequest(
            filter=dead_filter(
                queue=queue,
                type=type,
                fingerprint=fingerprint,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
            ),
            page_size=page_size,
            page_token=page_token or "",
        )
        response = await self._conn.unary(lambda s: s.tasks.ListDeadTasks, request, idempotent=True)
        return Page(
            items=[open_task(self._codec, Task.from_proto(t)) for t in response.tasks],
            next_page_token=response.next_page_token or None,
        )

    async def dead_groups(
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
        request = pb.ListDeadTaskGroupsRequest(
            filter=dead_filter(
                queue=queue,
                type=type,
                finished_after=finished_after,
                finished_before=finished_before,
                states=states,
            ),
            page_size=limit,
        )
        response = await self._conn.unary(
            lambda s: s.tasks.ListDeadTaskGroups, request, idempotent=True
        )
        return [DeadTaskGroup.from_proto(g) for g in response.groups]

    async def retry_tasks(
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
        request = pb.RetryTasksRequest(max_tasks=max_tasks)
        self._bulk_target(
            request, ids, queue, type, fingerprint, finished_after, finished_before, states
        )
        response = await self._conn.unary(lambda s: s.tasks.RetryTasks, request, idempotent=True)
        return BulkResult(
            response.retried, list(response.skipped_ids), list(response.not_found_ids),
            response.more,
        )  # fmt: skip

    async def delete_tasks(
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
        request = pb.DeleteTasksRequest(max_tasks=max_tasks)
        self._bulk_target(
            request, ids, queue, type, fingerprint, finished_after, finished_before, states
        )
        response = await self._conn.unary(lambda s: s.tasks.DeleteTasks, request, idempotent=True)
        return BulkResult(
            response.deleted, list(response.skipped_ids), list(response.not_found_ids),
            response.more,
        )  # fmt: skip

    @staticmethod
    def _bulk_target(
        request: pb.RetryTasksRequest | pb.DeleteTasksRequest,
        ids: Sequence[str] | None,
        *filters: Any,
    ) -> None:
        """Sets a bulk call's ids, or its filter (even empty) when there are none."""
        if ids is not None:
            if any(f is not None for f in filters):
                raise ValueError("give either ids or filter arguments, not both")
            request.ids.extend(ids)
            return
        queue, type_, fingerprint, after, before, states = filters
        request.filter.CopyFrom(
            dead_filter(
                queue=queue,
                type=type_,
                fingerprint=fingerprint,
                finished_after=after,
                finished_before=before,
                states=states,
            )
        )

    # -- waiting -----------------------------------------------------------------------

    async def watch(self, task_id: str) -> AsyncGenerator[Task, None]:
        """Yields the task's current state, then each change, until it is terminal.

        A broken stream is reopened by itself (after re-reading the task, so a change
        made while disconnected is not missed); it gives up with :class:`UnavailableError`
        only after about a minute without any coordinator answering. Intermediate
        states may be skipped while disconnected; the terminal state never is.
        """
        loop = asyncio.get_running_loop()
        last: Task | None = None
        failures = 0
        while True:
            opened = loop.time()
            try:
                if failures:
                    # Reopening: re-read first, the task may have moved on meanwhile.
                    task = await self.get(task_id)
                    if task != last:
                        last, failures = task, 0
                        yield task
                    if task.is_terminal:
                        return
                stream = self._conn.stream(
                    lambda s: s.tasks.WatchTask, pb.WatchTaskRequest(id=task_id)
                )
                # aclosing: leaving early must cancel the stream now, not at GC time.
                async with aclosing(stream):
                    async for response in stream:
                        task = open_task(self._codec, _task(response))
                        # A reopened stream repeats the current state: not news, and not
                        # progress either, so it does not reset the failure count.
                        if task != last:
                            last, failures = task, 0
                            yield task
                        if task.is_terminal:
                            return
            except RPCError as err:
                if not _stream_broke(err) or failures >= _MAX_WATCH_FAILURES:
                    raise
            # Broken, or (against the contract) ended before a terminal state: reopen.
            if loop.time() - opened > _WATCH_HEALTHY_AFTER:
                # It broke after a long healthy run (a coordinator restart, say): a fresh
                # incident, not the next failure of a cluster that cannot serve streams.
                failures = 0
            failures += 1
            await asyncio.sleep(_WATCH_BACKOFF.delay(failures))

    # A timeout argument rather than "wrap it in asyncio.timeout()": the sync twin needs
    # the same signature, and the error names the task and its last state.
    async def wait(
        self,
        task_id: str,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109
    ) -> Task:
        """Waits until the task is terminal (SUCCEEDED, DEAD or CANCELLED) and returns it.

        When the coordinator says that no connected worker serves the task (its type on
        its queue), a warning is logged once (logger ``conveyor.client``) and the
        timeout's error says so too.

        Args:
            timeout: Seconds (or a timedelta) to wait at most; ``None`` waits for good.

        Raises:
            WaitTimeoutError: The timeout passed first; the task keeps running.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        last: Task | None = None
        warned = False
        try:
            async with asyncio.timeout(seconds):
                updates = self.watch(task_id)
                async with aclosing(updates):
                    async for task in updates:
                        last = task
                        if task.is_terminal:
                            return task
                        if task.unserved and not warned:
                            warned = True
                            logger.warning("waiting for task %s: %s", task.id, task.unserved_hint())
        except TimeoutError as err:
            raise WaitTimeoutError(task_id, seconds or 0.0, last) from err
        # watch() only ends on a terminal state.
        raise AssertionError("watch() ended before the task finished")  # pragma: no cover

    async def result(
        self,
        task_id: str,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Waits for the task and returns its result decoded from JSON.

        Raises:
            TaskFailedError: The task ended DEAD (``last_error`` says why).
            TaskCancelledError: The task was cancelled.
            WaitTimeoutError: The timeout passed first.
            DecryptionError: The result is encrypted and this client's codec cannot
                open it (a key not in its ring, say).
        """
        task = await self.wait(task_id, timeout)
        if task.state is TaskState.DEAD:
            raise TaskFailedError(task)
        if task.state is TaskState.CANCELLED:
            raise TaskCancelledError(task)
        require_result(self._codec, task)
        return task.json()

    # -- schedules ---------------------------------------------------------------------

    async def create_schedule(
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
        schedule = spb.Schedule(
            name=name,
            cron=cron,
            time_zone=time_zone,
            task_template=TaskTemplate(type=type, payload=payload, **task).to_template(),
            overlap_policy=overlap_to_proto(overlap_policy),  # type: ignore[arg-type]
            catch_up_policy=catch_up_to_proto(catch_up_policy),  # type: ignore[arg-type]
            catch_up_limit=catch_up_limit or 0,
            paused=paused,
        )
        _set_times(schedule, start_time, end_time)
        if self._codec is not None:
            # The encrypted template is bound to the schedule's id: the client chooses it.
            schedule.id = str(uuid_utils.uuid7())
            seal_template(self._codec, schedule.task_template, schedule.id)
        response = await self._conn.unary(
            lambda s: s.tasks.CreateSchedule,
            spb.CreateScheduleRequest(schedule=schedule),
            idempotent=False,
        )
        if schedule.id and response.schedule.id != schedule.id:
            raise EncryptionError(
                f"the coordinator gave schedule {name!r} an id of its own, not the one its "
                "encrypted payload is bound to: the coordinator is too old for encrypted "
                "schedules. Delete the schedule (its tasks could not be opened) and upgrade "
                "the coordinator."
            )
        return open_schedule(self._codec, Schedule.from_proto(response.schedule))

    async def get_schedule(self, name: str) -> Schedule:
        """Returns the schedule with its next fire times and latest firings.

        Raises:
            RPCError: ``NOT_FOUND`` (reason ``SCHEDULE_NOT_FOUND``).
        """
        return await self._schedule_call(
            lambda s: s.tasks.GetSchedule, spb.GetScheduleRequest(name=name), idempotent=True
        )

    async def list_schedules(
        self, page_size: int = 100, page_token: str | None = None
    ) -> Page[Schedule]:
        """Returns one page of schedules, by name."""
        response = await self._conn.unary(
            lambda s: s.tasks.ListSchedules,
            spb.ListSchedulesRequest(page_size=page_size, page_token=page_token or ""),
            idempotent=True,
        )
        return Page(
            items=[open_schedule(self._codec, Schedule.from_proto(s)) for s in response.schedules],
            next_page_token=response.next_page_token or None,
        )

    async def update_schedule(
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
        schedule = spb.Schedule(name=name, etag=etag or "")
        paths: list[str] = []
        for path, value in (
            ("cron", cron),
            ("time_zone", time_zone),
            ("catch_up_limit", catch_up_limit),
        ):
            if value is not None:
                setattr(schedule, path, value)
                paths.append(path)
        if overlap_policy is not None:
            schedule.overlap_policy = overlap_to_proto(overlap_policy)  # type: ignore[assignment]
            paths.append("overlap_policy")
        if catch_up_policy is not None:
            schedule.catch_up_policy = catch_up_to_proto(catch_up_policy)  # type: ignore[assignment]
            paths.append("catch_up_policy")
        _set_times(schedule, start_time, end_time)
        paths += [p for p, v in (("start_time", start_time), ("end_time", end_time)) if v]
        paths += TaskTemplate.changes(schedule.task_template, type=type, payload=payload, **task)
        if not paths:
            raise ValueError("update_schedule() needs at least one field to change")
        await self._seal_update(schedule, paths)
        request = spb.UpdateScheduleRequest(schedule=schedule)
        request.update_mask.paths.extend(paths)
        return await self._schedule_call(
            lambda s: s.tasks.UpdateSchedule, request, idempotent=False
        )

    async def _seal_update(self, schedule: spb.Schedule, paths: builtins.list[str]) -> None:
        """Encodes the template payload of an update. The ciphertext is bound to the task
        type and the schedule's id, so a new type needs the payload again, and a new
        payload needs the id (and the type, when the update leaves it): both are read
        from the schedule, with the read's etag unless the caller gave one, so a
        concurrent change (or a schedule deleted and made again under the name) cannot
        slip in between."""
        if self._codec is None:
            return
        template = {"task_template.type", "task_template.payload", "task_template.content_type"}
        if not template.intersection(paths):
            return
        if "task_template.payload" not in paths:
            raise ValueError(
                "update_schedule() must pass payload= when it changes type= or "
                "content_type= with a codec: the encrypted payload is bound to its task type"
            )
        current = await self.get_schedule(schedule.name)
        schedule.etag = schedule.etag or current.etag
        task_type = schedule.task_template.type
        if "task_template.type" not in paths:
            task_type = current.type
        seal_template(self._codec, schedule.task_template, current.id, task_type)

    async def _schedule_call(
        self, method: StubMethod, request: Any, *, idempotent: bool
    ) -> Schedule:
        """One schedule call; the schedule as it answered, its template opened."""
        response = await self._conn.unary(method, request, idempotent=idempotent)
        return open_schedule(self._codec, Schedule.from_proto(response.schedule))

    async def delete_schedule(self, name: str) -> None:
        """Deletes a schedule; the tasks it submitted stay."""
        await self._conn.unary(
            lambda s: s.tasks.DeleteSchedule,
            spb.DeleteScheduleRequest(name=name),
            idempotent=False,
        )

    async def pause_schedule(self, name: str) -> Schedule:
        """Stops a schedule firing (pausing a paused one changes nothing)."""
        return await self._schedule_call(
            lambda s: s.tasks.PauseSchedule, spb.PauseScheduleRequest(name=name), idempotent=True
        )

    async def resume_schedule(self, name: str) -> Schedule:
        """Starts a paused schedule again from now; ticks missed while paused do not fire."""
        return await self._schedule_call(
            lambda s: s.tasks.ResumeSchedule, spb.ResumeScheduleRequest(name=name), idempotent=True
        )


def _task(response: pb.GetTaskResponse | pb.WatchTaskResponse) -> Task:
    task = Task.from_proto(response.task)
    if isinstance(response, pb.GetTaskResponse) and response.waiting_for:
        task = dataclasses.replace(task, waiting_for=tuple(response.waiting_for))
    if not response.unserved:
        return task
    return dataclasses.replace(
        task, unserved=True, unserved_encryption_key=response.unserved_encryption_key
    )


def _set_times(schedule: spb.Schedule, start: datetime | None, end: datetime | None) -> None:
    for name, value in (("start_time", start), ("end_time", end)):
        if value is None:
            continue
        if value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware, such as datetime.now(UTC)")
        getattr(schedule, name).CopyFrom(_timestamp(value))


def _stream_broke(err: RPCError) -> bool:
    # Worth reopening: the connection or the coordinator went away (UNAVAILABLE covers
    # shutdowns and leader changes), or a proxy reset the stream (INTERNAL, CANCELLED).
    # Anything else, such as TASK_NOT_FOUND, would only fail again.
    return isinstance(err, UnavailableError) or err.code in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    )


def _requests(tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> pb.SubmitTasksRequest:
    """The requests of ``tasks``, in order, in one SubmitTasks message (which is sent as
    it is when they fit in one call). A spec repeated (``[spec] * 10_000``) is converted
    once and copied after that: a copy costs a fifth of a conversion. Its relative times
    (``run_at``, ``deadline`` given as delays) are then resolved once for the whole
    call. Only for a list or tuple: a generator may yield one object changed in
    between."""
    call = pb.SubmitTasksRequest()
    requests = call.tasks
    if not isinstance(tasks, list | tuple):
        for t in tasks:
            requests.append(task_spec(t).to_proto())
        return call
    last: object = None
    last_request: pb.SubmitTaskRequest | None = None
    for task in tasks:
        if task is last and last_request is not None:
            requests.add().CopyFrom(last_request)
        else:
            last_request = task_spec(task).to_proto()
            requests.append(last_request)
            last = task
    return call


def _batches(requests: builtins.list[pb.SubmitTaskRequest]) -> Iterable[builtins.list[Any]]:
    batch: list[pb.SubmitTaskRequest] = []
    size = 0
    for request in requests:
        request_size = request.ByteSize()
        if batch and (len(batch) >= MAX_BATCH or size + request_size > _MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(request)
        size += request_size
    if batch:
        yield batch
