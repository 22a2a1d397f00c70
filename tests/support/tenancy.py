"""An in-process coordinator that requires API keys, for tests that need several tenants
and a look at the coordinator's own services (the firer, the backlog counter, metrics)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from security import Key, Keys
from testsupport import coordinator_config

from conveyor.coordinator import Coordinator
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import admin_service_pb2_grpc, task_service_pb2_grpc


@dataclass
class Secure:
    """A running coordinator with authentication, an admin channel and a key maker."""

    coordinator: Coordinator
    channel: grpc.aio.Channel
    admin_key: str
    keys: Keys

    @property
    def tasks(self) -> task_service_pb2_grpc.TaskServiceAsyncStub:
        return task_service_pb2_grpc.TaskServiceStub(self.channel)

    @property
    def admin(self) -> admin_service_pb2_grpc.AdminServiceAsyncStub:
        return admin_service_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_key}"),)

    async def tenant(self, name: str, *scopes: str) -> Key:
        return await self.keys.create(name, *(scopes or ("submit", "read", "operate")))


@contextlib.asynccontextmanager
async def secure_coordinator(dsn: str, **config: Any) -> AsyncIterator[Secure]:
    """Starts a coordinator (in this process) that requires keys, with a bootstrap admin
    key of tenant ``default``; ``config`` overrides CoordinatorConfig settings."""
    _, admin_key = api_keys.generate()
    coordinator = Coordinator(
        coordinator_config(dsn, authentication=True, bootstrap_key=admin_key, **config)
    )
    await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            yield Secure(coordinator, channel, admin_key, Keys(channel, admin_key))
    finally:
        await coordinator.stop(grace=1.0)
