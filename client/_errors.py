"""The client's own exceptions: how an awaited task ended, when it did not succeed.

Everything else the client raises comes from the one error catalog in
:mod:`conveyor.transport` (``_errors.py`` there draws the whole tree); every class is
exported by :mod:`conveyor.client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.transport._errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.client._models import Task

__all__ = ["TaskCancelledError", "TaskFailedError", "WaitTimeoutError"]


class TaskFailedError(ConveyorError):
    """The awaited task ended DEAD: its attempts ran out or it failed non-retryably.

    Attributes:
        task: The task in its final state.
        last_error: The error of its last attempt.
    """

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"task {task.id!r} ({task.type}) is DEAD after {task.attempt_summary}: "
            f"{task.last_error or 'no error recorded'}. Inspect its attempts, or redrive it "
            f"with a retry of task {task.id!r}."
        )
        self.task = task
        self.last_error = task.last_error


class TaskCancelledError(ConveyorError):
    """The awaited task was cancelled before it succeeded.

    Attributes:
        task: The task in its final state.
    """

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"task {task.id!r} ({task.type}) was cancelled; it has no result. "
            f"Submit it again if the work is still needed."
        )
        self.task = task


class WaitTimeoutError(ConveyorError, TimeoutError):
    """``wait()`` or ``result()`` gave up before the task finished.

    The task itself keeps running; wait again or cancel it. Also a builtin
    :class:`TimeoutError`, so code catching that keeps working. When the coordinator said
    that no connected worker serves the task, the message says so.

    Attributes:
        task_id: The awaited task.
        timeout: How long the client waited, in seconds.
        task: The last state seen, or ``None`` when none was seen.
    """

    def __init__(self, task_id: str, timeout: float, task: Task | None = None) -> None:
        state = f"still {task.state.name}" if task is not None else "not seen yet"
        message = f"task {task_id!r} is {state} after waiting {timeout:g}s"
        if task is not None and task.unserved:
            message += f": {task.unserved_hint()}"
        ConveyorError.__init__(
            self,
            f"{message}. Waiting does not affect the task: wait again with a longer timeout, "
            f"or cancel it.",
        )
        self.task_id = task_id
        self.timeout = timeout
        self.task = task
