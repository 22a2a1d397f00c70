"""The request context: who is calling and under what terms, for the handler to read.

Interceptors fill it (``api/interceptors/``) before a handler runs; a handler reads
it with :func:`current`. The authentication interceptor (``api/interceptors/auth.py``) sets
``tenant``, ``key_id`` and ``scopes`` from the call's API key with :func:`update` (with
authentication off they keep their defaults: tenant "default", no key); tracing reads
``traceparent``.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any

from conveyor.coordinator.config import DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What is known about the call being served."""

    method: str = ""
    """The full gRPC method, ``/conveyor.v1.TaskService/SubmitTask``."""
    request_id: str = ""
    """The caller's ``x-request-id``, or one made up; in logs and INTERNAL errors."""
    peer: str = ""
    """The caller's address without its port (``auth.peer_host``): what the failed-
    authentication throttle keys on and what audit rows record."""
    tenant: str = DEFAULT_TENANT
    key_id: str = ""
    """The id of the API key the call was authenticated with ("" with authentication off)."""
    scopes: frozenset[str] = frozenset()
    deadline: float | None = None
    """When the caller stops waiting, in event-loop time; None without a deadline."""
    traceparent: str = ""
    """The caller's W3C trace context (``traceparent`` metadata)."""


_DEFAULT = RequestContext()
_current: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "conveyor_request", default=_DEFAULT
)


def current() -> RequestContext:
    """The context of the request being served (defaults outside any request)."""
    return _current.get()


def bind(context: RequestContext) -> contextvars.Token[RequestContext]:
    """Makes ``context`` current for the rest of this task; reset with :func:`reset`."""
    return _current.set(context)


def update(**changes: Any) -> contextvars.Token[RequestContext]:
    """Replaces fields of the current context (an interceptor refining what it knows)."""
    return _current.set(dataclasses.replace(_current.get(), **changes))


def reset(token: contextvars.Token[RequestContext]) -> None:
    _current.reset(token)
