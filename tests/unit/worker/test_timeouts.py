"""The attempts' timeouts on one timer (``worker/_runtime.py``, ``_Timeouts``), on a loop
whose clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker._registry import TaskRegistry
from conveyor.worker._runtime import _Execution, _Timeouts


class FakeTimer:
    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at, self.callback, self.cancelled = at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time() and call_at() only: the clock moves when the test says."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, at: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(at, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[float]:
        return [t.at for t in self.timers if not t.cancelled]

    def advance(self, to: float) -> None:
        """Moves the clock and fires the timers due, as the loop would."""
        self.now = to
        for timer in [t for t in self.timers if not t.cancelled and t.at <= to]:
            timer.cancelled = True
            timer.callback()


def execution(name: str, timeout: float) -> _Execution:
    registry = TaskRegistry()
    handler = registry.register(name, lambda ctx, payload: None)
    return _Execution(
        key=(name, 1),
        lease=pb.Lease(task_id=name, attempt=1),
        assignment=pb.Assignment(),
        handler=handler,
        timeout=timeout,
        payload=b"",
        content_type="",
    )


def timeouts(loop: FakeLoop, expired: list[str]) -> _Timeouts:
    return _Timeouts(
        cast(asyncio.AbstractEventLoop, cast(Any, loop)), lambda e: expired.append(e.key[0])
    )


def test_attempts_time_out_in_deadline_order_across_timeout_values() -> None:
    loop, expired = FakeLoop(), list[str]()
    t = timeouts(loop, expired)
    t.add(execution("a", 10), 10, loop.now)  # due at 10
    loop.now = 1
    t.add(execution("b", 10), 10, loop.now)  # due at 11
    t.add(execution("c", 3), 3, loop.now)  # due at 4: the timer moves earlier
    assert loop.armed() == [4]
    loop.advance(4)
    assert expired == ["c"]
    assert loop.armed() == [10]
    loop.advance(10.5)
    assert expired == ["c", "a"]
    assert loop.armed() == [11]
    loop.advance(11)
    assert expired == ["c", "a", "b"]
    assert loop.armed() == []


def test_an_attempt_that_ended_never_times_out_and_is_let_go() -> None:
    loop, expired = FakeLoop(), list[str]()
    t = timeouts(loop, expired)
    first, second = execution("a", 5), execution("b", 5)
    t.add(first, 5, loop.now)
    loop.now = 2
    t.add(second, 5, loop.now)
    t.remove(first)
    t.remove(first)  # twice is harmless
    assert first.timeout_at is None
    loop.advance(5)  # first's deadline: nothing is due, the timer waits for second
    assert expired == []
    assert loop.armed() == [7]
    t.remove(second)
    loop.advance(7)
    assert expired == []
    assert loop.armed() == []


def test_expiring_one_attempt_may_start_another_with_its_own_timeout() -> None:
    # Expiring frees a slot, and the backlog's next attempt starts with a new timeout.
    loop, expired = FakeLoop(), list[str]()
    later = execution("later", 2)
    t: _Timeouts

    def expire(e: _Execution) -> None:
        expired.append(e.key[0])
        if e is first:
            t.add(later, 2, loop.now)

    t = _Timeouts(cast(asyncio.AbstractEventLoop, cast(Any, loop)), expire)
    first = execution("first", 1)
    t.add(first, 1, loop.now)
    loop.advance(1)
    assert loop.armed() == [3]
    loop.advance(3)
    assert expired == ["first", "later"]
