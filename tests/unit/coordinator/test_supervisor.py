"""The supervised lifecycle of the leader's services (coordinator/supervisor.py): a bug in
one round is logged, counted and retried; a fenced round steps down."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import asyncpg
import pytest
from testsupport import eventually

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.deps import Deps, Office
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.lifecycle.watchers import TaskWatchers
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.supervisor import Service


def _deps() -> Deps:
    office = Office("c")
    office.leader = True
    return Deps(
        config=CoordinatorConfig(dsn="postgresql://unused"),
        db=cast(Database, None),  # these services never touch it
        office=office,
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
    )


class Scripted(Service):
    """Raises each exception of ``script`` in turn, then succeeds."""

    name = "scripted"

    def __init__(self, deps: Deps, script: list[BaseException]) -> None:
        super().__init__(deps)
        self.script = script
        self.successes = 0

    async def step(self) -> float:
        if self.script:
            raise self.script.pop(0)
        self.successes += 1
        return 0.001


async def test_a_bug_is_logged_counted_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    service = Scripted(_deps(), [RuntimeError("bug"), asyncpg.PostgresConnectionError("down")])
    service.start()
    try:
        await asyncio.wait_for(service.wait_until(lambda s: s.successes >= 3), 10)
    finally:
        await service.stop()
    assert service.failures == 2
    assert isinstance(service.last_error, asyncpg.PostgresConnectionError)
    crashed = [r for r in caplog.records if "crashed (a bug)" in r.getMessage()]
    assert crashed and crashed[0].levelno == logging.ERROR and crashed[0].exc_info
    assert any("failed (down)" in r.getMessage() for r in caplog.records)


async def test_a_fenced_round_steps_down_and_ends_the_service() -> None:
    deps = _deps()
    seen: list[Fenced] = []
    deps.office.on_fenced = seen.append
    service = Scripted(deps, [Fenced(1)])
    service.start()
    await asyncio.wait_for(service.wait_until(lambda s: s.steps >= 1), 10)
    await eventually(lambda: not service.running, what="the fenced service to end")
    assert len(seen) == 1 and service.successes == 0
    await service.stop()


async def test_wake_cuts_the_wait_short() -> None:
    class Slow(Service):
        name = "slow"

        async def step(self) -> float:
            return 3600.0

    service = Slow(_deps())
    service.start()
    try:
        await asyncio.wait_for(service.wait_until(lambda s: s.steps >= 1), 10)
        service.wake()
        await asyncio.wait_for(service.wait_until(lambda s: s.steps >= 2), 10)
    finally:
        await service.stop()
