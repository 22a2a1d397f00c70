"""``conveyor worker --autoscale MIN:MAX``: a supervisor of worker processes, sized by load.

The supervisor is a plain process that runs no tasks. It starts ``MIN`` worker processes
(the same ``conveyor worker`` command line, each one an ordinary worker), then every
``interval`` seconds reads its queues' load from a coordinator (KEDA's external scaler
API, which every coordinator serves: tasks pending plus running, and how long the oldest
ready task has waited, i.e. the pickup latency; both counting only the task types its
worker processes serve, as a task no process of it could take is no reason to start
one) and decides with :class:`ScalePolicy`:

- up at once, to ``ceil(load / concurrency)`` processes, and one more than running while
  the oldest ready task has waited longer than ``latency`` (work waits although the count
  says it should not: slow handlers, a type few processes serve);
- down one process at a time, and only once the need has stayed below the running count
  for ``cooldown`` seconds (hysteresis: a lull between bursts stops nothing). A process
  is stopped with SIGTERM, the worker's graceful drain: it takes no new work and its
  running tasks get the grace period; the supervisor waits for it and never kills it;
- never outside MIN..MAX.

A worker process that exits without being asked to (killed, crashed) is restarted in its
slot after a backoff that doubles on each quick death (from ``min(1 s, interval)`` up to
30 s; a process that ran for a minute starts the count again), and the log says so. An
unreachable coordinator leaves the count as it is. SIGTERM or SIGINT to the supervisor
drains every process and exits once they have; a second one kills them.

Process supervision is asyncio's own (``create_subprocess_exec``, ``Process.wait``):
circus and supervisord run their own daemons and event loops (and circus brings ZeroMQ),
and neither sizes a pool by a metric; what is needed here is a few processes, their exit
codes and two signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("conveyor.worker.autoscale")

CHILD_ENV = "CONVEYOR_AUTOSCALE_CHILD"
"""Set in each worker process the supervisor starts (to its slot number): that process
runs as a plain worker, whatever ``--autoscale`` its command line carries."""
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0
"""Seconds a process must have run for its next death to start the backoff again."""


@dataclass(frozen=True, slots=True)
class Load:
    """What the coordinator says about the supervised queues."""

    tasks: float
    """Tasks pending plus running (of the types the worker processes serve)."""
    oldest_pending_age: float
    """Seconds the oldest ready task (of those types) has waited (0: none waits)."""


def parse_range(text: str) -> tuple[int, int]:
    """``(MIN, MAX)`` of ``MIN:MAX``; ValueError saying what is wrong."""
    low, colon, high = text.partition(":")
    try:
        minimum, maximum = int(low), int(high)
    except ValueError:
        minimum = maximum = -1
    if not colon or minimum < 0 or maximum < 1 or minimum > maximum:
        raise ValueError(
            f"--autoscale takes MIN:MAX worker processes, 0 <= MIN <= MAX and MAX >= 1 "
            f"(e.g. 1:8), got {text!r}"
        )
    return minimum, maximum


@dataclass
class ScalePolicy:
    """How many worker processes the load asks for, with hysteresis (module docstring)."""

    minimum: int
    maximum: int
    per_process: int
    """Tasks one process runs at once (its concurrency)."""
    latency: float
    """Seconds the oldest ready task may wait before one more process is started."""
    cooldown: float
    """Seconds the need must stay below the running count before one process stops."""
    _below_since: float | None = field(default=None, init=False)

    def decide(self, running: int, load: Load, now: float) -> int:
        """The number of processes to run, given ``running`` now and the ``load``."""
        need = math.ceil(load.tasks / self.per_process)
        if load.oldest_pending_age > self.latency:
            need = max(need, running + 1)
        target = min(self.maximum, max(self.minimum, need))
        if target >= running:
            self._below_since = None
            return target
        if self._below_since is None:
            self._below_since = now
        if now - self._below_since < self.cooldown:
            return running
        self._below_since = now  # the next step down waits a cooldown again
        return running - 1


@dataclass(eq=False)
class _Child:
    slot: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    quick_deaths: int = 0
    draining: bool = False
    restart: asyncio.Task[None] | None = None


class Supervisor:
    """Runs and sizes the worker processes (module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        policy: ScalePolicy,
        read_load: Callable[[], Awaitable[Load]],
        *,
        interval: float,
        env: dict[str, str] | None = None,
    ) -> None:
        self._command = list(command)
        self._policy = policy
        self._read_load = read_load
        self._interval = interval
        self._env = dict(os.environ if env is None else env)
        self._backoff = min(1.0, interval)
        self._children: dict[int, _Child] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def running(self) -> int:
        """Processes that count toward the size: running or about to be restarted, not
        draining."""
        return sum(1 for c in self._children.values() if not c.draining)

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> None:
        """Supervises until ``stop`` is set, then drains every process (killing them if
        ``force`` is set meanwhile)."""
        try:
            await self._resize(self._policy.minimum)
            while not stop.is_set():
                await self._step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval)
        finally:
            await self._shutdown(force)

    async def _step(self) -> None:
        try:
            load = await self._read_load()
        except Exception as exc:
            _log.warning("cannot read the queues' load (%s); keeping %d processes", exc,
                         self.running)  # fmt: skip
            return
        target = self._policy.decide(self.running, load, time.monotonic())
        if target != self.running:
            _log.info(
                "load %g tasks, oldest ready task waited %.1fs: %d -> %d worker processes",
                load.tasks, load.oldest_pending_age, self.running, target,
            )  # fmt: skip
        else:
            _log.debug(
                "load %g tasks, oldest ready task waited %.1fs: keeping %d worker processes",
                load.tasks, load.oldest_pending_age, self.running,
            )  # fmt: skip
        await self._resize(target)

    async def _resize(self, target: int) -> None:
        while self.running < target:
            slot = next(i for i in range(1, len(self._children) + 2) if i not in self._children)
            child = self._children[slot] = _Child(slot)
            await self._start(child)
        for child in sorted(self._children.values(), key=lambda c: -c.slot):
            if self.running <= target:
                break
            if not child.draining:
                self._drain(child)

    async def _start(self, child: _Child) -> None:
        env = {**self._env, CHILD_ENV: str(child.slot)}
        # Its own process group: a Ctrl-C at the terminal reaches the supervisor only, which
        # sends each process one SIGTERM (a second signal would stop a worker at once).
        child.process = await asyncio.create_subprocess_exec(
            *self._command, env=env, process_group=0
        )
        child.started = time.monotonic()
        _log.info("worker process %d started (pid %d)", child.slot, child.process.pid)
        waiter = asyncio.create_task(self._watch(child, child.process))
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    def _drain(self, child: _Child) -> None:
        child.draining = True
        if child.restart is not None:  # dead, waiting for its restart: just forget it
            child.restart.cancel()
            self._children.pop(child.slot, None)
            return
        if child.process is not None and child.process.returncode is None:
            _log.info("draining worker process %d (pid %d)", child.slot, child.process.pid)
            child.process.send_signal(signal.SIGTERM)

    async def _watch(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if child.draining or self._stopping:
            _log.info("worker process %d (pid %d) exited with %d after it was asked to drain",
                      child.slot, process.pid, code)  # fmt: skip
            self._children.pop(child.slot, None)
            return
        lived = time.monotonic() - child.started
        child.quick_deaths = 0 if lived >= STABLE_AFTER else child.quick_deaths + 1
        delay = self._delay(child)
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with {code}"
        _log.warning(
            "worker process %d (pid %d) %s after %.1fs: restarting it in %.1fs (backoff, "
            "quick death %d in a row)",
            child.slot, process.pid, how, lived, delay, child.quick_deaths,
        )  # fmt: skip
        child.process = None
        child.restart = asyncio.create_task(self._restart(child, delay))

    def _delay(self, child: _Child) -> float:
        """The backoff before restarting ``child``: doubling with each quick death."""
        return min(MAX_BACKOFF, self._backoff * 2.0 ** max(0, child.quick_deaths - 1))

    async def _restart(self, child: _Child, delay: float) -> None:
        await asyncio.sleep(delay)
        child.restart = None
        if child.draining or self._stopping:
            return
        try:
            await self._start(child)
        except OSError as exc:  # the command cannot start (gone, no resources): later
            child.quick_deaths += 1
            delay = self._delay(child)
            _log.error("cannot start worker process %d (%s): trying again in %.1fs",
                       child.slot, exc, delay)  # fmt: skip
            child.restart = asyncio.create_task(self._restart(child, delay))

    async def _shutdown(self, force: asyncio.Event) -> None:
        self._stopping = True
        for child in list(self._children.values()):
            if child.restart is not None:
                child.restart.cancel()
            self._drain(child)
        waiters = set(self._waiters)
        if not waiters:
            return
        _log.info("draining %d worker processes", len(waiters))
        every: asyncio.Future[Any] = asyncio.gather(*waiters)
        forced: asyncio.Future[Any] = asyncio.ensure_future(force.wait())
        try:
            await asyncio.wait((every, forced), return_when=asyncio.FIRST_COMPLETED)
            if not every.done():
                _log.warning("stopping at once: killing the worker processes")
                for child in self._children.values():
                    if child.process is not None and child.process.returncode is None:
                        child.process.kill()
            await every
        finally:
            forced.cancel()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
