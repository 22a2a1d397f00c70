"""Python client for Conveyor, the gRPC-first task queue.

Submit, inspect, wait for and cancel tasks, with :class:`AsyncClient` (asyncio) or its
blocking twin :class:`Client` (generated from it: same methods, arguments and docs)::

    from conveyor.client import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        task = await client.submit("echo", {"to": "ada@example.com"})
        print(await client.result(task.id, timeout=30))

Results are frozen dataclasses (:class:`Task`, :class:`TaskAttempt`, :class:`QueueStats`,
:class:`Schedule`); errors derive from :class:`ConveyorError` (the tree is drawn in
``conveyor/transport/_errors.py``). :class:`ConnectionOptions` holds the transport
settings (TLS, API key, metadata, interceptors). Logs go to the ``conveyor.client`` logger.
"""

from conveyor.client._async_client import AsyncClient
from conveyor.client._errors import TaskCancelledError, TaskFailedError, WaitTimeoutError
from conveyor.client._locks import Lock, SyncLock
from conveyor.client._models import (
    AttemptOutcome,
    BulkResult,
    CatchUpPolicy,
    CircuitBreaker,
    DeadTaskGroup,
    OverlapPolicy,
    Page,
    QueueStats,
    RateLimit,
    RetryPolicy,
    Schedule,
    ScheduleFiring,
    Task,
    TaskAttempt,
    TaskSpec,
    TaskState,
    WorkerInfo,
)
from conveyor.client._sync_client import Client
from conveyor.transport._encryption import (
    Binding,
    DecryptionError,
    EncryptionCodec,
    EncryptionError,
    KeyRing,
    KeyRingError,
    KeyUnavailableError,
    PayloadCodec,
)
from conveyor.transport._errors import (
    ApiKeyNotFoundError,
    ConveyorError,
    DeadlineExceededError,
    EtagMismatchError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidStateError,
    LeaseNotHeldError,
    LockNotHeldError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    PermissionDeniedError,
    ProtocolViolationError,
    QuotaExceededError,
    RateLimitNotFoundError,
    RPCError,
    ScheduleAlreadyExistsError,
    ScheduleNotFoundError,
    StoreUnavailableError,
    TaskNotFoundError,
    TaskTypeNotFoundError,
    UnauthenticatedError,
    UnavailableError,
    WatchTooSlowError,
    WebhookNotFoundError,
    WorkerIdInUseError,
    WorkerNotFoundError,
)
from conveyor.transport._options import ConnectionOptions
from conveyor.transport._tls import TLSConfigError, tls_credentials

__all__ = [
    "ApiKeyNotFoundError",
    "AsyncClient",
    "AttemptOutcome",
    "Binding",
    "BulkResult",
    "CatchUpPolicy",
    "CircuitBreaker",
    "Client",
    "ConnectionOptions",
    "ConveyorError",
    "DeadTaskGroup",
    "DeadlineExceededError",
    "DecryptionError",
    "EncryptionCodec",
    "EncryptionError",
    "EtagMismatchError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidStateError",
    "KeyRing",
    "KeyRingError",
    "KeyUnavailableError",
    "LeaseNotHeldError",
    "Lock",
    "LockNotHeldError",
    "NotLeaderError",
    "OutcomeUnknownError",
    "OverlapPolicy",
    "OverloadedError",
    "Page",
    "PayloadCodec",
    "PermissionDeniedError",
    "ProtocolViolationError",
    "QueueStats",
    "QuotaExceededError",
    "RPCError",
    "RateLimit",
    "RateLimitNotFoundError",
    "RetryPolicy",
    "Schedule",
    "ScheduleAlreadyExistsError",
    "ScheduleFiring",
    "ScheduleNotFoundError",
    "StoreUnavailableError",
    "SyncLock",
    "TLSConfigError",
    "Task",
    "TaskAttempt",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskSpec",
    "TaskState",
    "TaskTypeNotFoundError",
    "UnauthenticatedError",
    "UnavailableError",
    "WaitTimeoutError",
    "WatchTooSlowError",
    "WebhookNotFoundError",
    "WorkerIdInUseError",
    "WorkerInfo",
    "WorkerNotFoundError",
    "tls_credentials",
]
