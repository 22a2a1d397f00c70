"""How late the worker's event loop runs: the load signal its heartbeats carry.

A handler that blocks the event loop (CPU work or a blocking call in an ``async def``)
delays everything else on it: other handlers, heartbeats, results. :class:`LoopLag` wakes
every :data:`TICK` seconds and notes how much later than asked it woke; each heartbeat
sends the most since the previous one (:meth:`LoopLag.take`) in ``Heartbeat.loop_lag``,
and the coordinator assigns nothing to a worker whose lag passes its limit until it
recovers (``coordinator/dispatch/health.py``). A block of the loop is seen as lasting at
least its length less one tick (the timer may fall due anywhere in it).
"""

from __future__ import annotations

import asyncio

TICK = 0.1
"""Seconds between the probe's wake-ups: ten a second cost nothing measurable."""


class LoopLag:
    """The event loop's lateness, peak since the last :meth:`take` (module docstring)."""

    def __init__(self) -> None:
        self._peak = 0.0

    async def run(self) -> None:
        """Measures until cancelled (one of the session's loops)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            late = loop.time() - due
            self._peak = max(self._peak, late)

    def take(self) -> float:
        """The most the loop ran late since the previous call, in seconds; starts over."""
        peak, self._peak = self._peak, 0.0
        return peak
