"""Error mapping: whatever a handler raises leaves as the right rich status.

Domain errors, store failures and bugs go through the one table in
``coordinator/errors.py``; handlers have no try/except of their own for this. A request
that cannot even be decoded (a string that is not UTF-8) is INVALID_ARGUMENT too, not the
UNKNOWN gRPC would answer: the deserializer hands the handler an :class:`Undecodable`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc.aio

from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.api.interceptors.base import Behavior, BehaviorInterceptor, Deserializer
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    StoreUnavailable,
    domain_error,
    internal_status,
    to_status,
)

_log = logging.getLogger("conveyor.coordinator.rpc")


class Undecodable:
    """A request message that failed to decode (what :class:`ErrorInterceptor` passes on)."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self, what: str = "request") -> InvalidArgument:
        return InvalidArgument([FieldViolation(what, f"cannot be decoded: {self.problem}")])


class ErrorInterceptor(BehaviorInterceptor):
    """Aborts every failed call with the status :func:`~conveyor.coordinator.errors.to_status`
    gives (INTERNAL, logged with a request id, for anything that is no known failure)."""

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                error = domain_error(exc)
                if error is None:
                    request_id = request_context.current().request_id
                    _log.exception("%s failed (request %s): a bug", method, request_id)
                    await context.abort_with_status(internal_status(request_id))
                    raise  # abort_with_status raised already; this satisfies the type checker
                if isinstance(error, StoreUnavailable):
                    _log.warning("%s failed: %s", method, error.message)
                await context.abort_with_status(to_status(error))
                raise

        return guarded

    def deserializer(self, method: str, inner: Deserializer | None) -> Deserializer | None:
        if inner is None:
            return None

        def safe(raw: bytes) -> Any:
            try:
                return inner(raw)
            except Exception as exc:  # DecodeError, or anything a bad message provokes
                return Undecodable(str(exc))

        return safe
