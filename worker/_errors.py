"""Exceptions of the worker SDK (the whole tree is drawn in ``conveyor/transport/_errors.py``)."""

from __future__ import annotations

from conveyor.transport._errors import ConveyorError

__all__ = ["NoHandlersError", "NonRetryableError", "WorkerLoadError"]


class NonRetryableError(Exception):
    """Raise from a handler to fail the attempt for good.

    The coordinator moves the task straight to ``DEAD`` (the dead-letter queue) instead of
    scheduling another attempt. Any other exception a handler raises is retryable: the task
    is retried with backoff until its ``max_attempts`` are used up.

    Use it for failures that another attempt cannot fix, such as a malformed payload.
    (It is the handler's exception, not the SDK's, so it is no :class:`ConveyorError`.)
    """


class WorkerLoadError(Exception):
    """:func:`load_worker` could not produce a :class:`Worker` from the given spec.

    A usage error of the command line (a bad ``MODULE:ATTR``) rather than a failure of
    the SDK, so it is no :class:`ConveyorError` (``conveyor worker`` exits 2 for it).
    """


class NoHandlersError(ConveyorError):
    """A :class:`Worker` with no task handlers was started.

    Such a worker could take no task, so it refuses to start instead of connecting.
    Register handlers with ``@worker.task("type")`` first. ``str(err)`` is one line, fit
    for a command line's error output.
    """
