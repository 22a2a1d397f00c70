"""The blocking client: a thin shell over :class:`AsyncClient`.

It owns a private event loop running in a daemon thread and hands every call to the
:class:`AsyncClient` living on that loop, so conversions, failover, error mapping and
waiting exist once, in the async implementation. Blocking callers may come from any
thread, including threads that run an event loop of their own.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from conveyor.client._async_client import _UNSET, AsyncClient
from conveyor.client._models import (
    CatchUpPolicy,
    OverlapPolicy,
    Page,
    QueueStats,
    RetryPolicy,
    Schedule,
    Task,
    TaskAttempt,
    TaskSpec,
    TaskState,
)

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
    Thread-safe. The methods and their arguments are those of :class:`AsyncClient`;
    see there for details.

    Args:
        coordinators: One ``"host:port"``, several separated by commas, or a sequence.
        timeout: Seconds each call may take, retries and failover included.
        api_key: Sent as ``authorization: Bearer <api_key>`` with every call.
    """

    def __init__(
        self,
        coordinators: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float | None = 10.0,
        api_key: str | None = None,
    ) -> None:
        # Built before the thread starts, so bad arguments raise here and leak no thread.
        self._async = AsyncClient(coordinators, timeout=timeout, api_key=api_key)
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

    def submit(
        self,
        type: str,
        payload: Any = None,
        *,
        queue: str = "default",
        idempotency_key: str | None = None,
        priority: int = 0,
        run_at: datetime | timedelta | None = None,
        max_attempts: int | None = None,
        timeout: timedelta | float | None = None,
        retry_policy: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        raw: bool = False,
        content_type: str | None = None,
        traceparent: str | None = None,
    ) -> Task:
        """Submits one task and returns it as committed. See :meth:`AsyncClient.submit`."""
        return self._loop.run(
            self._async.submit(
                type,
                payload,
                queue=queue,
                idempotency_key=idempotency_key,
                priority=priority,
                run_at=run_at,
                max_attempts=max_attempts,
                timeout=timeout,
                retry_policy=retry_policy,
                labels=labels,
                raw=raw,
                content_type=content_type,
                traceparent=traceparent,
            )
        )

    def submit_many(self, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> builtins.list[Task]:
        """Submits many tasks in batches. See :meth:`AsyncClient.submit_many`."""
        return self._loop.run(self._async.submit_many(tasks))

    def get(self, task_id: str) -> Task:
        """Returns the task's current state. See :meth:`AsyncClient.get`."""
        return self._loop.run(self._async.get(task_id))

    def get_with_attempts(self, task_id: str) -> tuple[Task, builtins.list[TaskAttempt]]:
        """Returns the task and all its attempts. See :meth:`AsyncClient.get_with_attempts`."""
        return self._loop.run(self._async.get_with_attempts(task_id))

    def list(
        self,
        queue: str | None = None,
        state: TaskState | str | None = None,
        type: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> Page[Task]:
        """Returns one page of tasks, newest first. See :meth:`AsyncClient.list`."""
        return self._loop.run(self._async.list(queue, state, type, page_size, page_token))

    def iter_tasks(
        self,
        queue: str | None = None,
        state: TaskState | str | None = None,
        type: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Yields every matching task across pages. See :meth:`AsyncClient.iter_tasks`."""
        return self._loop.iterate(self._async.iter_tasks(queue, state, type, page_size))

    def queues(self) -> builtins.list[QueueStats]:
        """Returns every queue with its counts. See :meth:`AsyncClient.queues`."""
        return self._loop.run(self._async.queues())

    def cancel(self, task_id: str) -> Task:
        """Cancels an unfinished task. See :meth:`AsyncClient.cancel`."""
        return self._loop.run(self._async.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        """Redrives a DEAD task. See :meth:`AsyncClient.retry`."""
        return self._loop.run(self._async.retry(task_id))

    def watch(self, task_id: str) -> Iterator[Task]:
        """Yields the task's state and each change until terminal. See :meth:`AsyncClient.watch`."""
        return self._loop.iterate(self._async.watch(task_id))

    def wait(self, task_id: str, timeout: float | timedelta | None = None) -> Task:
        """Blocks until the task is terminal and returns it. See :meth:`AsyncClient.wait`."""
        return self._loop.run(self._async.wait(task_id, timeout))

    def result(self, task_id: str, timeout: float | timedelta | None = None) -> Any:
        """Blocks until the task finishes; returns its result. See :meth:`AsyncClient.result`."""
        return self._loop.run(self._async.result(task_id, timeout))

    def create_schedule(
        self,
        name: str,
        cron: str,
        type: str,
        payload: Any = None,
        *,
        time_zone: str = "UTC",
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        timeout: timedelta | float | None = None,
        retry_policy: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        raw: bool = False,
        content_type: str | None = None,
        overlap_policy: OverlapPolicy | str | None = None,
        catch_up_policy: CatchUpPolicy | str | None = None,
        catch_up_limit: int | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        paused: bool = False,
    ) -> Schedule:
        """Creates a cron schedule. See :meth:`AsyncClient.create_schedule`."""
        return self._loop.run(
            self._async.create_schedule(
                name,
                cron,
                type,
                payload,
                time_zone=time_zone,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout,
                retry_policy=retry_policy,
                labels=labels,
                raw=raw,
                content_type=content_type,
                overlap_policy=overlap_policy,
                catch_up_policy=catch_up_policy,
                catch_up_limit=catch_up_limit,
                start_time=start_time,
                end_time=end_time,
                paused=paused,
            )
        )

    def get_schedule(self, name: str) -> Schedule:
        """Returns a schedule. See :meth:`AsyncClient.get_schedule`."""
        return self._loop.run(self._async.get_schedule(name))

    def list_schedules(self, page_size: int = 100, page_token: str | None = None) -> Page[Schedule]:
        """Returns one page of schedules. See :meth:`AsyncClient.list_schedules`."""
        return self._loop.run(self._async.list_schedules(page_size, page_token))

    def update_schedule(
        self,
        name: str,
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        type: str | None = None,
        payload: Any = _UNSET,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: timedelta | float | None = None,
        retry_policy: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        raw: bool = False,
        content_type: str | None = None,
        overlap_policy: OverlapPolicy | str | None = None,
        catch_up_policy: CatchUpPolicy | str | None = None,
        catch_up_limit: int | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        etag: str | None = None,
    ) -> Schedule:
        """Changes the given fields of a schedule. See :meth:`AsyncClient.update_schedule`."""
        return self._loop.run(
            self._async.update_schedule(
                name,
                cron=cron,
                time_zone=time_zone,
                type=type,
                payload=payload,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout,
                retry_policy=retry_policy,
                labels=labels,
                raw=raw,
                content_type=content_type,
                overlap_policy=overlap_policy,
                catch_up_policy=catch_up_policy,
                catch_up_limit=catch_up_limit,
                start_time=start_time,
                end_time=end_time,
                etag=etag,
            )
        )

    def delete_schedule(self, name: str) -> None:
        """Deletes a schedule. See :meth:`AsyncClient.delete_schedule`."""
        self._loop.run(self._async.delete_schedule(name))

    def pause_schedule(self, name: str) -> Schedule:
        """Stops a schedule firing. See :meth:`AsyncClient.pause_schedule`."""
        return self._loop.run(self._async.pause_schedule(name))

    def resume_schedule(self, name: str) -> Schedule:
        """Starts a paused schedule again. See :meth:`AsyncClient.resume_schedule`."""
        return self._loop.run(self._async.resume_schedule(name))
