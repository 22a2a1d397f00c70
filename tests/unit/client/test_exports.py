"""Pins the public surface of conveyor.client: changing it must be a decision."""

from __future__ import annotations

import inspect
import re
from typing import Any

import conveyor.client
import conveyor.worker
from conveyor.client import _codegen

EXPECTED = [
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


def test_exported_names() -> None:
    assert sorted(conveyor.client.__all__) == EXPECTED


def test_exports_resolve_to_private_modules() -> None:
    for name in EXPECTED:
        obj = getattr(conveyor.client, name)
        if isinstance(obj, str):
            continue
        # The error catalog and ConnectionOptions live in the layer shared with the worker.
        assert obj.__module__.startswith(("conveyor.client._", "conveyor.transport._")), name


def test_worker_exports() -> None:
    assert sorted(conveyor.worker.__all__) == [
        "Binding",
        "CancellationSignal",
        "ConnectionOptions",
        "DecryptionError",
        "EncryptionCodec",
        "EncryptionError",
        "KeyRing",
        "KeyRingError",
        "KeyUnavailableError",
        "KeyedCodec",
        "LeaseNotHeldError",
        "Ledger",
        "LedgerEntry",
        "Lock",
        "LockNotHeldError",
        "NoHandlersError",
        "NonRetryableError",
        "PayloadCodec",
        "TLSConfigError",
        "TaskContext",
        "Worker",
        "WorkerIdInUseError",
        "WorkerLoadError",
        "fencing_token",
        "load_worker",
        "tls_credentials",
    ]


def test_every_error_derives_from_the_root() -> None:
    for name in EXPECTED:
        obj = getattr(conveyor.client, name)
        if name.endswith("Error"):
            assert issubclass(obj, conveyor.client.ConveyorError), name


def _public(cls: type) -> dict[str, Any]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")}


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    assert _public(conveyor.client.Client).keys() == _public(conveyor.client.AsyncClient).keys()


def _sync_annotation(annotation: str) -> str:
    # An async generator of T is an iterator of T in the blocking client, a Lock a SyncLock.
    if annotation == "Lock":
        return "SyncLock"
    return re.sub(r"^AsyncGenerator\[(.*), None\]$", r"Iterator[\1]", annotation)


def test_sync_signatures_defaults_and_docs_match_the_async_ones() -> None:
    """Not only the names: parameters, kinds, defaults, annotations and docstrings."""
    sync_members = _public(conveyor.client.Client)
    for name, async_member in _public(conveyor.client.AsyncClient).items():
        sync_member = sync_members[name]
        if isinstance(async_member, property):
            assert isinstance(sync_member, property), name
            continue
        async_sig = inspect.signature(async_member)
        sync_sig = inspect.signature(sync_member)
        assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values()), name
        assert sync_sig.return_annotation == _sync_annotation(async_sig.return_annotation), name
        if name != "close":  # written by hand: it also stops the loop thread
            assert inspect.getdoc(sync_member) == inspect.getdoc(async_member), name
    init = inspect.signature(conveyor.client.Client.__init__)
    assert init == inspect.signature(conveyor.client.AsyncClient.__init__)


def test_generated_sync_client_is_current() -> None:
    """_sync_client.py is what the generator makes of _async_client.py today."""
    current = _codegen.SYNC_PATH.read_text(encoding="utf-8")
    wanted = _codegen.generate(_codegen.ASYNC_PATH.read_text(encoding="utf-8"), current)
    assert current == wanted, "stale: run python -m conveyor.client._codegen"
