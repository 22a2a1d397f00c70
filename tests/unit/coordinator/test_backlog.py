"""The approximate backlog count behind max_backlog (coordinator/backlog.py): it errs on the
safe side, also for submits that are in flight while the count runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from conveyor.coordinator.backlog import BacklogCounter
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.deps import Deps, Events, Office
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.sessions import SessionRegistry
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.watchers import TaskWatchers


class FakeDatabase:
    """Answers the count with ``unfinished``; ``during`` runs while the count is taken."""

    def __init__(self) -> None:
        self.unfinished = 0
        self.during: Any = None

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        yield self

    async def fetchval(self, *args: Any) -> int:
        if self.during is not None:
            self.during()
        return self.unfinished


def _counter(limit: int) -> tuple[BacklogCounter, FakeDatabase]:
    db = FakeDatabase()
    deps = Deps(
        config=CoordinatorConfig(dsn="postgresql://unused", max_backlog=limit),
        db=cast(Database, db),
        office=Office("c"),
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
        events=Events(),
    )
    return BacklogCounter(deps), db


async def test_submits_past_the_limit_are_refused() -> None:
    counter, _ = _counter(5)
    counter.admit(3)
    counter.done(3)
    counter.admit(2)
    with pytest.raises(QuotaExceeded) as caught:
        counter.admit(1)
    assert caught.value.subject == "max_backlog" and caught.value.retry_after


async def test_a_submit_in_flight_during_the_count_still_counts() -> None:
    counter, db = _counter(5)
    counter.admit(2)
    counter.done(2)
    counter.admit(3)  # not committed yet: the count will not see it
    db.unfinished = 2
    await counter.step()
    assert counter.estimate == 5
    # One that finishes while the count runs is kept too (it may be missing from it).
    db.during = lambda: counter.done(3)
    await counter.step()
    assert counter.estimate >= 5
    db.during = None
    db.unfinished = 5
    await counter.step()
    assert counter.estimate == 5
    db.unfinished = 1  # work finished
    await counter.step()
    assert counter.estimate == 1


async def test_no_limit_costs_nothing() -> None:
    counter, _ = _counter(0)
    counter.admit(10**9)
    counter.done(10**9)
    assert counter.estimate == 0
