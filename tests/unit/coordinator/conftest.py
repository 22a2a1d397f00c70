"""Fixtures of the coordinator's tests that run services or store functions alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from testsupport import leader_pool, service_deps

from conveyor.coordinator.deps import Deps


@pytest.fixture
async def deps(database_dsn: str) -> AsyncIterator[Deps]:
    """What a coordinator service needs, as the leader of a fresh term, on a fresh database."""
    pool, epoch = await leader_pool(database_dsn)
    try:
        yield service_deps(pool, database_dsn, epoch=epoch)
    finally:
        await pool.close()
