"""Python client for Conveyor, the gRPC-first task queue.

Submit, inspect, wait for and cancel tasks, with :class:`AsyncClient` (asyncio) or its
blocking twin :class:`Client`::

    from conveyor.client import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        task = await client.submit("send_email", {"to": "ada@example.com"})
        print(await client.result(task.id, timeout=30))

Results are frozen dataclasses (:class:`Task`, :class:`TaskAttempt`, :class:`QueueStats`,
:class:`Schedule`);
errors derive from :class:`ConveyorError` (the tree is drawn in ``_errors.py``).
"""

from conveyor.client._async_client import AsyncClient
from conveyor.client._errors import (
    ConveyorError,
    DeadlineExceededError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidStateError,
    NotLeaderError,
    OverloadedError,
    RPCError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    UnavailableError,
    WaitTimeoutError,
)
from conveyor.client._models import (
    AttemptOutcome,
    CatchUpPolicy,
    OverlapPolicy,
    Page,
    QueueStats,
    RetryPolicy,
    Schedule,
    ScheduleFiring,
    Task,
    TaskAttempt,
    TaskSpec,
    TaskState,
)
from conveyor.client._sync_client import Client

__all__ = [
    "AsyncClient",
    "AttemptOutcome",
    "CatchUpPolicy",
    "Client",
    "ConveyorError",
    "DeadlineExceededError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidStateError",
    "NotLeaderError",
    "OverlapPolicy",
    "OverloadedError",
    "Page",
    "QueueStats",
    "RPCError",
    "RetryPolicy",
    "Schedule",
    "ScheduleFiring",
    "Task",
    "TaskAttempt",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskSpec",
    "TaskState",
    "UnavailableError",
    "WaitTimeoutError",
]
