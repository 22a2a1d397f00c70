"""The one wrapper every leader-only API handler goes through.

It refuses calls on a follower (UNAVAILABLE, NOT_LEADER, with the leader's address) and
maps domain and store errors to rich gRPC statuses, so each handler only raises.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg
import grpc

from conveyor.coordinator.errors import ConveyorError, NotLeader, StoreUnavailable, to_status

_log = logging.getLogger("conveyor.coordinator.rpc")


class LeaderAware(Protocol):
    def _is_leader(self) -> bool: ...

    def _leader_address(self) -> str: ...


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def leader_rpc(handler: Handler) -> Handler:
    """Decorates an API handler: leader only, errors become statuses."""

    @functools.wraps(handler)
    async def wrapper(
        self: LeaderAware,
        request: Any,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> Any:
        try:
            if not self._is_leader():
                raise NotLeader(self._leader_address())
            return await handler(self, request, context)
        except ConveyorError as exc:
            await context.abort_with_status(to_status(exc))
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            _log.warning("%s failed: store unavailable: %s", handler.__name__, exc)
            await context.abort_with_status(to_status(StoreUnavailable(str(exc))))
        except asyncpg.QueryCanceledError as exc:
            await context.abort_with_status(to_status(StoreUnavailable(f"query timed out: {exc}")))

    return wrapper  # type: ignore[return-value]
