"""TaskWatchers: what is due for a read, who gets which row, and the per-tenant cap."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.coordinator.errors import QuotaExceeded, StoreUnavailable, TaskNotFound
from conveyor.coordinator.lifecycle.watchers import TaskWatchers

TASK = "01890000-0000-7000-8000-000000000001"


async def test_a_change_marks_only_watched_tasks_due_and_wakes_the_reader() -> None:
    watchers = TaskWatchers()
    woken: list[int] = []
    watchers.on_due = lambda: woken.append(1)
    watchers.changed([TASK])  # nobody watches: nothing due, nobody woken
    assert watchers.take_due(everything=False) == [] and woken == []
    with watchers.watch("acme", TASK):
        assert watchers.take_due(everything=False) == [("acme", TASK)]  # the first read
        watchers.changed([TASK, "01890000-0000-7000-8000-000000000002"])
        assert watchers.take_due(everything=False) == [("acme", TASK)]
        assert watchers.take_due(everything=False) == []
        assert watchers.take_due(everything=True) == [("acme", TASK)]
    assert len(watchers) == 0 and watchers.take_due(everything=True) == []


async def test_each_watch_gets_its_tenants_row_and_only_the_latest() -> None:
    watchers = TaskWatchers()
    with watchers.watch("acme", TASK) as mine, watchers.watch("globex", TASK) as theirs:
        keys = watchers.take_due(everything=False)
        watchers.deliver(keys, {("acme", TASK): {"state": 1}})
        watchers.deliver(keys, {("acme", TASK): {"state": 3}})
        assert await mine.next() == {"state": 3}
        with pytest.raises(TaskNotFound):
            await theirs.next()  # the same id in another tenant is not its task
        # Both offers were taken at once: nothing is left to read.
        waiting = asyncio.get_running_loop().create_task(mine.next())
        await asyncio.sleep(0)
        assert not waiting.done()
        waiting.cancel()


async def test_a_failed_first_read_ends_the_watch_and_a_later_one_does_not() -> None:
    watchers = TaskWatchers()
    with watchers.watch("acme", TASK) as first:
        keys = watchers.take_due(everything=False)
        watchers.fail(keys, StoreUnavailable("down"))
        with pytest.raises(StoreUnavailable):
            await first.next()
    with watchers.watch("acme", TASK) as second:
        watchers.deliver(watchers.take_due(everything=False), {("acme", TASK): {"state": 1}})
        assert await second.next() == {"state": 1}
        watchers.fail([("acme", TASK)], StoreUnavailable("down"))
        waiting = asyncio.get_running_loop().create_task(second.next())
        await asyncio.sleep(0)
        assert not waiting.done()  # a missed refresh, not the end
        waiting.cancel()


def test_each_tenant_may_hold_max_per_tenant_watches() -> None:
    watchers = TaskWatchers(max_per_tenant=2)
    with watchers.watch("acme", TASK), watchers.watch("acme", TASK):
        with pytest.raises(QuotaExceeded) as caught, watchers.watch("acme", TASK):
            pass
        assert caught.value.subject == "watch_streams" and caught.value.retry_after
        with watchers.watch("globex", TASK):
            assert len(watchers) == 3
    with watchers.watch("acme", TASK):
        assert len(watchers) == 1
