"""Pins the public surface of conveyor.client: changing it must be a decision."""

from __future__ import annotations

import conveyor.client

EXPECTED = [
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


def test_exported_names() -> None:
    assert sorted(conveyor.client.__all__) == EXPECTED


def test_exports_resolve_to_private_modules() -> None:
    for name in EXPECTED:
        obj = getattr(conveyor.client, name)
        assert obj.__module__.startswith("conveyor.client._"), name


def test_every_error_derives_from_the_root() -> None:
    for name in EXPECTED:
        obj = getattr(conveyor.client, name)
        if name.endswith("Error"):
            assert issubclass(obj, conveyor.client.ConveyorError), name


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(conveyor.client.Client) == public(conveyor.client.AsyncClient)
