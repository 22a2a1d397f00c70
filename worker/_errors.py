"""Exceptions of the worker SDK."""

from __future__ import annotations

__all__ = ["NonRetryableError", "WorkerLoadError"]


class NonRetryableError(Exception):
    """Raise from a handler to fail the attempt for good.

    The coordinator moves the task straight to ``DEAD`` (the dead-letter queue) instead of
    scheduling another attempt. Any other exception a handler raises is retryable: the task
    is retried with backoff until its ``max_attempts`` are used up.

    Use it for failures that another attempt cannot fix, such as a malformed payload.
    """


class WorkerLoadError(Exception):
    """:func:`load_worker` could not produce a :class:`Worker` from the given spec."""
