"""Every error status the coordinator sends becomes the right exception, details included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from conveyor.client import (
    AsyncClient,
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
    TaskState,
    UnavailableError,
    WaitTimeoutError,
)
from conveyor.client._errors import _ERROR_TABLE, error_from_rpc
from conveyor.client._models import Task
from conveyor.v1 import task_pb2

Code = grpc.StatusCode

CASES: list[tuple[Code, str | None, dict[str, str], type[RPCError], dict[str, Any], str]] = [
    (
        Code.NOT_FOUND,
        "TASK_NOT_FOUND",
        {"task_id": "t-9"},
        TaskNotFoundError,
        {"task_id": "t-9"},
        "task 't-9' not found",
    ),
    (
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_CONFLICT",
        {"idempotency_key": "order-1", "task_id": "t-1"},
        IdempotencyConflictError,
        {"existing_task_id": "t-1", "idempotency_key": "order-1"},
        "idempotency key 'order-1' is already used by task 't-1'",
    ),
    (
        Code.FAILED_PRECONDITION,
        "INVALID_STATE",
        {"task_id": "t-2", "state": "SUCCEEDED"},
        InvalidStateError,
        {"task_id": "t-2", "state": TaskState.SUCCEEDED},
        "task 't-2' is SUCCEEDED",
    ),
    (
        Code.UNAVAILABLE,
        "STORE_UNAVAILABLE",
        {},
        UnavailableError,
        {"retry_after": 0.25},
        "cannot reach its store",
    ),
    (
        Code.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        {},
        OverloadedError,
        {"retry_after": 0.25},
        "overloaded",
    ),
    (Code.DEADLINE_EXCEEDED, None, {}, DeadlineExceededError, {}, "timeout"),
    (Code.PERMISSION_DENIED, None, {}, RPCError, {"code": Code.PERMISSION_DENIED}, "denied"),
    # RESOURCE_EXHAUSTED without OVERLOADED is gRPC's own (oversized message), not load.
    (Code.RESOURCE_EXHAUSTED, None, {}, RPCError, {}, "RESOURCE_EXHAUSTED"),
]


@pytest.mark.parametrize(
    ("code", "reason", "metadata", "cls", "attrs", "text"),
    CASES,
    ids=[f"{c[0].name}-{c[1]}" for c in CASES],
)
async def test_status_maps_to_class(
    fake: Any,
    address: str,
    status: Callable[..., grpc.Status],
    code: Code,
    reason: str | None,
    metadata: dict[str, str],
    cls: type[RPCError],
    attrs: dict[str, Any],
    text: str,
) -> None:
    fake.fail("GetTask", status(code, "denied", reason=reason, metadata=metadata, retry_after=0.25))
    async with AsyncClient(address, timeout=2) as client:
        with pytest.raises(RPCError) as caught:
            await client.get("t-9")
    err = caught.value
    assert type(err) is cls
    assert err.code is code
    assert err.reason == reason
    assert err.server_message == "denied"
    assert err.address == address
    for name, value in attrs.items():
        assert getattr(err, name) == value, name
    assert text in str(err)


async def test_not_found_from_the_server(address: str) -> None:
    async with AsyncClient(address) as client:
        with pytest.raises(TaskNotFoundError) as caught:
            await client.get("missing")
    assert caught.value.task_id == "missing"
    assert "Check the id" in str(caught.value)


async def test_bad_request_field_violations(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    fake.fail(
        "SubmitTask",
        status(
            Code.INVALID_ARGUMENT,
            "invalid request",
            reason="INVALID_ARGUMENT",
            violations=[("type", "must not be empty"), ("priority", "must be -1000..1000")],
        ),
    )
    async with AsyncClient(address) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.submit("", priority=5000)
    err = caught.value
    assert err.field_violations == [
        ("type", "must not be empty"),
        ("priority", "must be -1000..1000"),
    ]
    assert str(err).startswith("invalid request: type: must not be empty; priority: must be")
    assert "Fix the named fields" in str(err)


async def test_not_leader_exhausted_carries_leader_address(
    fake: Any, address: str, status: Callable[..., grpc.Status]
) -> None:
    # The "leader" it points to is itself, so redirects can never succeed.
    fake.always_fail["GetTask"] = status(
        Code.UNAVAILABLE,
        "not the leader",
        reason="NOT_LEADER",
        metadata={"leader_address": address},
        retry_after=0.001,
    )
    async with AsyncClient(address) as client:
        with pytest.raises(NotLeaderError) as caught:
            await client.get("t")
    assert caught.value.leader_address == address
    assert isinstance(caught.value, UnavailableError)
    assert fake.count("GetTask") == 5  # the first try and four redirects


def test_table_covers_every_contract_row() -> None:
    rows = {
        (Code.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (Code.NOT_FOUND, "TASK_NOT_FOUND"),
        (Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_CONFLICT"),
        (Code.FAILED_PRECONDITION, "INVALID_STATE"),
        (Code.UNAVAILABLE, "NOT_LEADER"),
        (Code.UNAVAILABLE, "STORE_UNAVAILABLE"),
        (Code.RESOURCE_EXHAUSTED, "OVERLOADED"),
    }
    assert rows <= set(_ERROR_TABLE)


def test_garbled_details_still_map_by_code() -> None:
    class Broken(grpc.RpcError):
        def code(self) -> Code:
            return Code.UNAVAILABLE

        def details(self) -> str:
            return "gone"

        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return (("grpc-status-details-bin", b"\xff\xff not a status"),)

    err = error_from_rpc(Broken(), address="h:1")
    assert type(err) is UnavailableError
    assert err.reason is None
    assert "h:1 is unavailable: gone" in str(err)


def test_outcome_errors_explain_themselves() -> None:
    dead = Task.from_proto(
        task_pb2.Task(
            id="t1", type="send", state=task_pb2.TASK_STATE_DEAD, attempt=3, last_error="SMTP 550"
        )
    )
    failed = TaskFailedError(dead)
    assert failed.last_error == "SMTP 550" and failed.task is dead
    assert "is DEAD after 3 attempt(s): SMTP 550" in str(failed)
    assert "retry('t1')" in str(failed)

    cancelled = TaskCancelledError(dead)
    assert "was cancelled" in str(cancelled)

    timeout = WaitTimeoutError("t1", 2.5, dead)
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, ConveyorError)
    assert "after waiting 2.5s" in str(timeout)
