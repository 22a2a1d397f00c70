"""Payload decoding, result encoding and error text for one attempt."""

from __future__ import annotations

import concurrent.futures.thread
import inspect
import json
import os
import traceback
from types import CodeType
from typing import Any

from conveyor.transport._error_text import MAX_ERROR_BYTES, storable_error
from conveyor.worker._context import TaskContext
from conveyor.worker._registry import Handler

__all__ = [
    "MAX_ERROR_BYTES",
    "TaskFailure",
    "call_sync_handler",
    "decode_payload",
    "describe_exception",
    "encode_result",
    "sanitize_error",
]


class TaskFailure(Exception):
    """An attempt failed for a reason the worker, not the handler, determined."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def decode_payload(handler: Handler, payload: bytes, content_type: str) -> Any:
    """The value a handler receives: the bytes for raw handlers, else the decoded JSON.

    An empty payload decodes to ``None`` so that tasks submitted without a payload reach
    JSON handlers too. A payload that is not JSON fails the attempt for good: another
    attempt would see the same bytes.
    """
    if handler.raw:
        return payload
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskFailure(
            f"payload of task type {handler.type!r} is not valid JSON "
            f"(content type {content_type or 'unset'!r}): {exc}; register the handler "
            "with raw=True to receive the bytes",
            retryable=False,
        ) from exc


def encode_result(handler: Handler, value: Any) -> bytes:
    """The result bytes for a handler's return value.

    An unencodable return value fails the attempt for good: the handler already ran, and
    running it again would repeat its side effects only to fail the same way.
    """
    if handler.raw:
        # The common answers first: neither is awaitable, and the check below (an ABC's
        # isinstance) cost more than the rest of a no-op task's encoding.
        if value is None:
            return b""
        if type(value) is bytes:
            return value
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # no "never awaited" warning on top of the real error
        raise TaskFailure(
            f"handler for {handler.type!r} returned an awaitable from a thread; "
            "declare it with `async def` so that it runs on the event loop",
            retryable=False,
        )
    if handler.raw:
        if value is None:
            return b""
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        raise TaskFailure(
            f"raw handler for {handler.type!r} must return bytes or None, "
            f"not {type(value).__name__}",
            retryable=False,
        )
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TaskFailure(
            f"result of task type {handler.type!r} is not JSON-serializable: {exc}",
            retryable=False,
        ) from exc


def call_sync_handler(handler: Handler, ctx: TaskContext, payload: bytes) -> bytes:
    """Decode, run and encode in one go; runs in a worker thread.

    Decoding and encoding happen here rather than on the event loop because a large JSON
    document takes long enough to parse to stall every other task on the loop.
    """
    value = handler.func(ctx, decode_payload(handler, payload, ctx.content_type))
    return encode_result(handler, value)


def describe_exception(exc: BaseException, *, with_traceback: bool = True) -> str:
    """``"Type: message"``, followed by the traceback, made fit by :func:`sanitize_error`.

    The traceback starts at the handler: the SDK's and the thread pool's own frames above
    it say nothing about the failure.
    """
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not with_traceback or exc.__traceback__ is None:
        return sanitize_error(summary)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_plumbing(tb.tb_frame.f_code):
        tb = tb.tb_next
    trace = "".join(traceback.format_exception(type(exc), exc, tb))
    return sanitize_error(f"{summary}\n\n{trace}")


# The SDK's private modules (not demo.py, whose handlers are user code) and the pool's.
_PLUMBING_PREFIXES = (
    os.path.join(os.path.dirname(__file__), "_"),
    os.path.dirname(concurrent.futures.thread.__file__) + os.sep,
)


def _is_plumbing(code: CodeType) -> bool:
    return code.co_filename.startswith(_PLUMBING_PREFIXES)


def sanitize_error(text: str) -> str:
    """Error text the coordinator always accepts (see :func:`storable_error`)."""
    return storable_error(text)
