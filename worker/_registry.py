"""The task registry: which handler runs which task type."""

from __future__ import annotations

import dataclasses
import dis
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

__all__ = ["Handler", "TaskRegistry"]

#: The signature of a handler: ``(ctx, payload) -> result``, async or sync.
HandlerFunc = Callable[..., Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """One registered handler."""

    type: str
    func: HandlerFunc
    raw: bool
    is_async: bool
    #: An ``async def`` function whose body has no ``await``, ``async for`` or ``async
    #: with``: its coroutine can never suspend, so it runs to its end in its first step.
    never_suspends: bool = False


def _is_async_callable(func: object) -> bool:
    # Unwrap partials, and look at __call__ for callable objects, so that
    # `functools.partial(async_fn, ...)` and instances with `async def __call__` are run on
    # the event loop rather than handed to a thread where they would only create a
    # coroutine object and never run it.
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - we need the attribute itself
    return call is not None and inspect.iscoroutinefunction(call)


def _never_suspends(func: object) -> bool:
    """Whether ``func`` is an ``async def`` function whose coroutine cannot suspend.

    A coroutine suspends only at a ``YIELD_VALUE`` of its own code (every ``await``,
    ``async for`` and ``async with`` compiles to one; what it calls without awaiting runs
    to its end like any call). Only plain functions are judged: a partial or a callable
    object may change what it runs, so it counts as one that may suspend.
    """
    if type(func) is not types.FunctionType:
        return False
    code = func.__code__
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    return all(ins.opname != "YIELD_VALUE" for ins in dis.get_instructions(code))


class TaskRegistry:
    """Maps task types to handlers; filled before the worker starts."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._frozen = False

    def register(self, task_type: str, func: HandlerFunc, *, raw: bool = False) -> Handler:
        """Register ``func`` for ``task_type``; raises on duplicates or after start."""
        if not isinstance(task_type, str) or not task_type.strip():
            raise ValueError(f"task type must be a non-empty string, got {task_type!r}")
        if not callable(func):
            raise TypeError(f"handler for {task_type!r} is not callable: {func!r}")
        if self._frozen:
            # Task types are announced in Hello; a late registration would not be
            # advertised to the coordinator until some later reconnect.
            raise RuntimeError(
                f"cannot register task type {task_type!r}: the worker is already running"
            )
        if task_type in self._handlers:
            raise ValueError(f"task type {task_type!r} already has a handler")
        handler = Handler(
            type=task_type,
            func=func,
            raw=raw,
            is_async=_is_async_callable(func),
            never_suspends=_never_suspends(func),
        )
        self._handlers[task_type] = handler
        return handler

    def get(self, task_type: str) -> Handler | None:
        """The handler for ``task_type``, or ``None``."""
        return self._handlers.get(task_type)

    def types(self) -> list[str]:
        """Registered task types, in registration order."""
        return list(self._handlers)

    def freeze(self, frozen: bool = True) -> None:
        """Forbid (or again allow) registrations while the worker runs."""
        self._frozen = frozen

    def __len__(self) -> int:
        return len(self._handlers)
