"""The approximate backlog count behind each tenant's max_backlog (coordinator/backlog.py):
it errs on the safe side, also for submits that are in flight while the count runs, and one
tenant's backlog never counts against another's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.deps import Deps, Office
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.lifecycle.watchers import TaskWatchers
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.tenancy.backlog import BacklogCounter


class FakeDatabase:
    """Answers the count with ``unfinished`` (tenant "t"; ``others`` for the rest);
    ``during`` runs while the count is taken."""

    def __init__(self) -> None:
        self.unfinished = 0
        self.others: dict[str, int] = {}
        self.during: Any = None

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        yield self

    async def fetch(self, *args: Any) -> list[dict[str, Any]]:
        if self.during is not None:
            self.during()
        counts = {"t": self.unfinished, **self.others}
        return [{"tenant": t, "n": n} for t, n in counts.items() if n]


def _counter(limit: int) -> tuple[BacklogCounter, FakeDatabase]:
    db = FakeDatabase()
    deps = Deps(
        config=CoordinatorConfig(dsn="postgresql://unused", max_backlog=limit),
        db=cast(Database, db),
        office=Office("c"),
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
    )
    return BacklogCounter(deps), db


async def test_submits_past_the_limit_are_refused() -> None:
    counter, _ = _counter(5)
    counter.admit("t", 3, 5)
    counter.done("t", 3)
    counter.admit("t", 2, 5)
    with pytest.raises(QuotaExceeded) as caught:
        counter.admit("t", 1, 5)
    assert caught.value.subject == "max_backlog" and caught.value.retry_after
    assert "'t'" in caught.value.message
    # Another tenant's backlog is its own.
    counter.admit("u", 5, 5)
    assert counter.estimate("t") == 5 and counter.estimate("u") == 5


async def test_a_submit_in_flight_during_the_count_still_counts() -> None:
    counter, db = _counter(5)
    counter.admit("t", 2, 5)
    counter.done("t", 2)
    counter.admit("t", 3, 5)  # not committed yet: the count will not see it
    db.unfinished = 2
    await counter.step()
    assert counter.estimate("t") == 5
    # One that finishes while the count runs is kept too (it may be missing from it).
    db.during = lambda: counter.done("t", 3)
    await counter.step()
    assert counter.estimate("t") >= 5
    db.during = None
    db.unfinished = 5
    await counter.step()
    assert counter.estimate("t") == 5
    db.unfinished = 1  # work finished
    await counter.step()
    assert counter.estimate("t") == 1


async def test_the_count_is_per_tenant() -> None:
    counter, db = _counter(5)
    db.unfinished, db.others = 4, {"u": 1}
    await counter.step()
    assert (counter.estimate("t"), counter.estimate("u"), counter.estimate("v")) == (4, 1, 0)
    counter.check("u", 4, 5)
    with pytest.raises(QuotaExceeded):
        counter.check("t", 2, 5)


async def test_without_limits_nothing_is_counted() -> None:
    counter, db = _counter(0)
    db.during = lambda: pytest.fail("counted without any limit")
    counter.admit("t", 10**9)
    counter.done("t", 10**9)
    await counter.step()
    assert counter.estimate("t") == 0
