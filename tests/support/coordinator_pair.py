"""Two in-process coordinators on one database, with keys required: the second takes
office and fences the first, which keeps serving as a follower (no etcd needed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from testsupport import coordinator_config, eventually

from conveyor.coordinator import Coordinator
from conveyor.coordinator.tenancy import keys as api_keys


@contextlib.asynccontextmanager
async def coordinator_pair(
    dsn: str, **settings: Any
) -> AsyncIterator[tuple[Coordinator, Coordinator, str]]:
    """(follower, leader, admin key); ``settings`` override CoordinatorConfig's."""
    _, admin_key = api_keys.generate()
    config = {"authentication": True, "bootstrap_key": admin_key, **settings}
    follower = Coordinator(coordinator_config(dsn, **config))
    await follower.start()
    leader = Coordinator(coordinator_config(dsn, **config))
    try:
        await leader.start()
        await eventually(lambda: not follower.leader, timeout=10, what="the first to step down")
        yield follower, leader, admin_key
    finally:
        await leader.stop(grace=1.0)
        await follower.stop(grace=1.0)


async def known_everywhere(coordinators: tuple[Coordinator, ...], *key_ids: str) -> None:
    """Waits until every coordinator's key directory holds the keys (a key made through
    one coordinator reaches the others by NOTIFY, within a second)."""

    def known() -> bool:
        return all(
            c.directory is not None and all(k in c.directory.keys for k in key_ids)
            for c in coordinators
        )

    await eventually(known, timeout=10, what="the new keys on every coordinator")
