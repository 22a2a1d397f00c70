"""Lifecycles, one owner: every long-lived component, and the leader's services.

A :class:`Supervisor` starts components in order and stops the ones it started in the
reverse order, once, whatever stops it (a clean shutdown, a start that failed half-way,
the end of a leader's term). A component is anything with ``start()`` (plain or async)
and ``async stop()``: the coordinator's store, telemetry, key directory, audit log, group
commits, gRPC server and leadership are one supervisor's (``server.py``); the leader's
services are another's, for as long as a term lasts (``leader/leadership.py``).

A :class:`Service` implements :meth:`Service.step` (one round of work, returning how long
to wait before the next; :meth:`Service.wake` cuts the wait short). The lifecycle around
it is the same for every service (dispatcher, promoter, reaper, schedule firer, backlog
counter):

- ``start()`` when this coordinator takes office, ``stop()`` when it leaves (a few are
  every coordinator's for the life of the process instead: the watch reader, the
  backlog counters);
- a step that raises is logged (a warning for a store outage, the traceback for anything
  else, which is a bug), counted in ``failures``, and retried after a growing backoff;
  one bad round never ends the service;
- a step that meets :class:`~conveyor.coordinator.errors.Fenced` (a newer leader exists)
  reports it to the office, which steps down, and the service ends;
- tests wait on :meth:`Service.wait_until` (checked after every step) instead of sleeping.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import ClassVar, Protocol, Self, TypeVar

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import Fenced, is_store_error

_log = logging.getLogger("conveyor.coordinator.services")

BACKOFF_BASE = 0.05
BACKOFF_MAX = 5.0


class Component(Protocol):
    """A long-lived part of the coordinator: started once, stopped once."""

    def start(self) -> object:
        """Starts it (or returns an awaitable that does)."""

    async def stop(self) -> None:
        """Stops it, after finishing (or giving up on) what it holds."""


C = TypeVar("C", bound=Component)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancels a component's own task and waits for it to end (None: nothing to stop)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Supervisor:
    """Starts components in order; stops those started in reverse order (see above)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._started: list[Component] = []

    @property
    def components(self) -> list[Component]:
        """The components started, in start order."""
        return list(self._started)

    async def start(self, component: C) -> C:
        """Starts ``component`` (after the ones started before it); returns it."""
        started = component.start()
        if inspect.isawaitable(started):
            await started
        self._started.append(component)
        return component

    async def stop(self) -> None:
        """Stops every component started, the last one first. One that fails to stop is
        logged; the others still stop."""
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception:
                _log.exception("%s: stopping %s failed", self.name, type(component).__name__)


class Service(abc.ABC):
    """A background service of the leader; see the module docstring."""

    name: ClassVar[str]

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()
        self.steps = 0
        """Steps finished (failed ones included)."""
        self.failures = 0
        """Steps that raised."""
        self.last_error: BaseException | None = None

    @abc.abstractmethod
    async def step(self) -> float:
        """One round of work; returns the seconds to wait before the next round."""

    def wake(self) -> None:
        """Runs the next step now (or right after the current one)."""
        self._wakeup.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def wait_until(self, condition: Callable[[Self], bool]) -> None:
        """Returns once ``condition(self)`` holds, checked after every step (for tests)."""
        async with self._progress:
            await self._progress.wait_for(lambda: condition(self))

    async def _run(self) -> None:
        consecutive = 0
        while True:
            self._wakeup.clear()
            try:
                delay = await self.step()
                consecutive = 0
            except Fenced as exc:
                await self._stepped(exc)
                self.deps.office.fenced(exc)
                return
            except Exception as exc:
                consecutive += 1
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**consecutive)
                if is_store_error(exc):
                    _log.warning("%s failed (%s); retrying in %.2fs", self.name, exc, delay)
                else:
                    _log.exception("%s crashed (a bug); retrying in %.2fs", self.name, delay)
                await self._stepped(exc)
            else:
                await self._stepped(None)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()

    async def _stepped(self, error: BaseException | None) -> None:
        self.steps += 1
        if error is not None:
            self.failures += 1
            self.last_error = error
        async with self._progress:
            self._progress.notify_all()
