"""Fills the request context (``api/context.py``) before the handler runs."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc.aio

from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.api.interceptors.base import Behavior, BehaviorInterceptor
from conveyor.coordinator.tenancy.auth import peer_host

REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"


class ContextInterceptor(BehaviorInterceptor):
    """Binds a :class:`~conveyor.coordinator.context.RequestContext` for every call."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def with_context(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = traceparent = ""
            for key, value in context.invocation_metadata() or ():
                if key == REQUEST_ID_KEY:
                    request_id = str(value)[:128]
                elif key == TRACEPARENT_KEY:
                    traceparent = str(value)[:128]
            remaining = context.time_remaining()
            token = request_context.bind(
                request_context.RequestContext(
                    method=method,
                    request_id=request_id or os.urandom(8).hex(),
                    peer=peer_host(context.peer()),
                    deadline=None
                    if remaining is None
                    else asyncio.get_running_loop().time() + remaining,
                    traceparent=traceparent,
                )
            )
            try:
                return await behavior(request, context)
            finally:
                request_context.reset(token)

        return with_context
