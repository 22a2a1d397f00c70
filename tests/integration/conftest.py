"""Fixtures for integration tests: an in-process coordinator on a fresh database, raw
protocol workers for driving the stream by hand, and direct SQL access for checking what
the database holds (the ground truth every test compares against)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from testsupport import RawWorker, coordinator_config

from conveyor.coordinator import Coordinator
from conveyor.coordinator.store.db import _session_settings
from conveyor.coordinator.store.migrator import migrate
from conveyor.v1 import task_service_pb2_grpc


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    """CoordinatorConfig settings for the ``coordinator`` fixture; a test module overrides
    this fixture to change them (``{"metrics_listen": "127.0.0.1:0"}``)."""
    return {}


@pytest.fixture
async def coordinator(
    database_dsn: str, coordinator_settings: dict[str, Any]
) -> AsyncIterator[Coordinator]:
    coord = Coordinator(coordinator_config(database_dsn, **coordinator_settings))
    await coord.start()
    try:
        yield coord
    finally:
        await coord.stop(grace=1.0)


@pytest.fixture
async def db(database_dsn: str, coordinator: Coordinator) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the coordinator's database (schema already migrated)."""
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def conn(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the coordinator's session settings to a migrated database."""
    connection = await asyncpg.connect(database_dsn, server_settings=_session_settings())
    try:
        await migrate(connection)
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def stub(
    coordinator: Coordinator,
) -> AsyncIterator[task_service_pb2_grpc.TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
async def raw_workers(coordinator: Coordinator) -> AsyncIterator[Callable[[], RawWorker]]:
    made: list[RawWorker] = []

    def make() -> RawWorker:
        worker = RawWorker(coordinator.address)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        await worker.close()
