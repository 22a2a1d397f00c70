"""Leader-only routing: a follower refuses the calls only the leader may serve.

The refusal is UNAVAILABLE with ``ErrorInfo`` reason NOT_LEADER and the leader's address
(empty while there is none), which the client and the worker SDK follow. Which methods any
coordinator may serve is one table, ``ANY_COORDINATOR`` in ``transport/_routing.py``,
shared with the client, which spreads submits and reads over the coordinators by it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc.aio

from conveyor.coordinator.api.interceptors.base import (
    Behavior,
    BehaviorInterceptor,
    take_first_message,
)
from conveyor.coordinator.errors import NotLeader
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.transport._routing import ANY_COORDINATOR

__all__ = ["ANY_COORDINATOR", "LeaderInterceptor"]


class LeaderInterceptor(BehaviorInterceptor):
    def __init__(self, is_leader: Callable[[], bool], leader_address: Callable[[], str]) -> None:
        super().__init__()
        self._is_leader = is_leader
        self._leader_address = leader_address
        self._client_streaming = api_keys.client_streaming_methods()

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        if method in ANY_COORDINATOR:
            return behavior
        is_leader, leader_address = self._is_leader, self._leader_address
        # A worker's stream refused at once lost NOT_LEADER to gRPC's own INTERNAL now
        # and then, and with it the leader's address (see take_first_message).
        read_first = method in self._client_streaming

        async def leader_only(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not is_leader():
                if read_first:
                    await take_first_message(context)
                raise NotLeader(leader_address())
            return await behavior(request, context)

        return leader_only
