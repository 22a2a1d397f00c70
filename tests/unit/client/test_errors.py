"""Every error status the coordinator sends becomes the right exception, details included."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest

import conveyor.client
import conveyor.worker
from conveyor.client import (
    ApiKeyNotFoundError,
    AsyncClient,
    ConveyorError,
    DeadlineExceededError,
    EtagMismatchError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidStateError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    PermissionDeniedError,
    ProtocolViolationError,
    QuotaExceededError,
    RPCError,
    ScheduleAlreadyExistsError,
    ScheduleNotFoundError,
    StoreUnavailableError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskState,
    UnauthenticatedError,
    UnavailableError,
    WaitTimeoutError,
    WorkerIdInUseError,
    WorkerNotFoundError,
)
from conveyor.client._models import Task
from conveyor.transport import _errors
from conveyor.transport._errors import ERROR_CLASSES, error_from_rpc
from conveyor.v1 import errors_pb2, task_pb2

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
        StoreUnavailableError,
        {"retry_after": 0.25},
        "cannot reach its store",
    ),
    (
        Code.NOT_FOUND,
        "SCHEDULE_NOT_FOUND",
        {"name": "nightly"},
        ScheduleNotFoundError,
        {"name": "nightly"},
        "no schedule named 'nightly'",
    ),
    (
        Code.ALREADY_EXISTS,
        "SCHEDULE_ALREADY_EXISTS",
        {"name": "nightly"},
        ScheduleAlreadyExistsError,
        {"name": "nightly"},
        "a schedule named 'nightly' exists already",
    ),
    (
        Code.ABORTED,
        "ETAG_MISMATCH",
        {"etag": "e2"},
        EtagMismatchError,
        {"etag": "e2"},
        "Read it again",
    ),
    (Code.UNAVAILABLE, "OUTCOME_UNKNOWN", {}, OutcomeUnknownError, {}, "may or may not"),
    (
        Code.FAILED_PRECONDITION,
        "WORKER_ID_IN_USE",
        {"worker_id": "w-1"},
        WorkerIdInUseError,
        {"worker_id": "w-1"},
        "refused worker id 'w-1'",
    ),
    (Code.INVALID_ARGUMENT, "PROTOCOL_VIOLATION", {}, ProtocolViolationError, {}, "Upgrade"),
    # A reason this client does not know yet falls back to the code's class.
    (Code.UNAVAILABLE, "SOMETHING_NEW", {}, UnavailableError, {}, "is unavailable"),
    (
        Code.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        {},
        OverloadedError,
        {"retry_after": 0.25},
        "overloaded",
    ),
    (Code.DEADLINE_EXCEEDED, None, {}, DeadlineExceededError, {}, "timeout"),
    (
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        {"scope": "submit", "key_id": "k1"},
        PermissionDeniedError,
        {"scope": "submit", "key_id": "k1"},
        "--scope",
    ),
    (
        Code.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        {"problem": "revoked", "key_id": "k1"},
        UnauthenticatedError,
        {"problem": "revoked", "key_id": "k1"},
        "CONVEYOR_API_KEY",
    ),
    (
        Code.NOT_FOUND,
        "API_KEY_NOT_FOUND",
        {"key_id": "k9"},
        ApiKeyNotFoundError,
        {"key_id": "k9"},
        "keys list",
    ),
    (
        Code.NOT_FOUND,
        "WORKER_NOT_FOUND",
        {"worker_id": "w9"},
        WorkerNotFoundError,
        {"worker_id": "w9"},
        "conveyor status",
    ),
    # Without a reason (a proxy's refusal), the code still says what went wrong.
    (Code.PERMISSION_DENIED, None, {}, PermissionDeniedError, {"scope": None}, "--scope"),
    (Code.UNAUTHENTICATED, None, {}, UnauthenticatedError, {"problem": None}, "API key"),
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
    # Every call fails alike: the retryable ones are resent until the timeout leaves no
    # room for the server's 0.25 s RetryInfo, then raised as they are.
    fake.always_fail["GetTask"] = status(
        code, "denied", reason=reason, metadata=metadata, retry_after=0.25
    )
    async with AsyncClient(address, timeout=0.4) as client:
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


def test_every_error_reason_has_exactly_one_class() -> None:
    """The catalog walk: the proto enum is the one list of reasons the client knows."""
    reasons = {
        n for n in errors_pb2.ErrorReason.values() if n != errors_pb2.ERROR_REASON_UNSPECIFIED
    }
    assert set(ERROR_CLASSES) == reasons
    classes = list(ERROR_CLASSES.values())
    assert len(set(classes)) == len(classes), "two reasons share a class"
    for number, cls in ERROR_CLASSES.items():
        assert issubclass(cls, RPCError)
        # Each class is exported to applications under its own name.
        assert getattr(conveyor.client, cls.__name__) is cls, errors_pb2.ErrorReason.Name(number)


@pytest.mark.parametrize("number", sorted(ERROR_CLASSES))
def test_each_reason_maps_to_its_class_through_a_status(
    number: errors_pb2.ErrorReason.ValueType, status: Callable[..., grpc.Status]
) -> None:
    reason = errors_pb2.ErrorReason.Name(number).removeprefix("ERROR_REASON_")
    sent = status(Code.FAILED_PRECONDITION, "no", reason=reason)

    class Failed(grpc.RpcError):
        def code(self) -> Code:
            return sent.code

        def details(self) -> str:
            return sent.details

        # typeshed has a _Metadatum class here; gRPC gives (key, value) pairs.
        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
            return tuple(sent.trailing_metadata)

    err = error_from_rpc(Failed())
    assert type(err) is ERROR_CLASSES[number]
    assert err.reason == reason


def test_a_reason_from_another_domain_is_not_ours(status: Callable[..., grpc.Status]) -> None:
    sent = status(Code.UNAVAILABLE, "proxy says no", reason="NOT_LEADER")
    # Rewrite the ErrorInfo's domain, as a gateway in front of the coordinator might.
    from google.rpc import error_details_pb2, status_pb2

    raw = status_pb2.Status.FromString(dict(sent.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    raw.details[0].Unpack(info)
    info.domain = "gateway.example"
    raw.details[0].Pack(info)

    class Failed(grpc.RpcError):
        def code(self) -> Code:
            return Code.UNAVAILABLE

        # typeshed has a _Metadatum class here; gRPC gives (key, value) pairs.
        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
            return (("grpc-status-details-bin", raw.SerializeToString()),)

    err = error_from_rpc(Failed())
    assert type(err) is UnavailableError and err.reason is None


def test_quota_failure_details_are_read(status: Callable[..., grpc.Status]) -> None:
    from google.rpc import error_details_pb2, status_pb2

    sent = status(Code.RESOURCE_EXHAUSTED, "backlog full", reason="QUOTA_EXCEEDED", retry_after=2)
    raw = status_pb2.Status.FromString(dict(sent.trailing_metadata)["grpc-status-details-bin"])
    raw.details.add().Pack(
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject="tenant:default", description="pending backlog 100000 reached"
                )
            ]
        )
    )

    class Failed(grpc.RpcError):
        def code(self) -> Code:
            return Code.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "backlog full"

        # typeshed has a _Metadatum class here; gRPC gives (key, value) pairs.
        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
            return (("grpc-status-details-bin", raw.SerializeToString()),)

    err = error_from_rpc(Failed())
    assert isinstance(err, QuotaExceededError)
    assert err.violations == [("tenant:default", "pending backlog 100000 reached")]
    assert err.retry_after == 2
    assert "tenant:default: pending backlog 100000 reached" in str(err)
    assert "retry_resource_exhausted=True" in str(err)


def _drawn_tree(doc: str) -> dict[str, str | None]:
    """Class name -> drawn parent, read from the box drawing of the module docstring."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        stripped = line.strip()
        if not stripped or not (stripped[0].isalpha() or stripped[0] in "│├└"):
            continue
        name_at = next((i for i, c in enumerate(line) if c.isalpha()), None)
        if name_at is None:
            continue
        name = line[name_at:].split()[0]
        if not name.endswith("Error"):
            continue
        while stack and stack[-1][0] >= name_at:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((name_at, name))
    return parents


def test_the_drawn_tree_is_current() -> None:
    """Every exported exception is drawn in the tree, under its real base class."""
    drawn = _drawn_tree(_errors.__doc__ or "")
    exported = {
        obj
        for module in (conveyor.client, conveyor.worker)
        for obj in (getattr(module, name) for name in module.__all__)
        if isinstance(obj, type) and issubclass(obj, ConveyorError)
    }
    assert set(drawn) == {cls.__name__ for cls in exported}
    for cls in exported:
        parent = drawn[cls.__name__]
        if parent is None:
            assert cls is ConveyorError
        else:
            # The nearest public base: private intermediate classes are not drawn.
            base = next(b for b in cls.__mro__[1:] if not b.__name__.startswith("_"))
            assert base.__name__ == parent, cls.__name__


def test_garbled_details_still_map_by_code() -> None:
    class Broken(grpc.RpcError):
        def code(self) -> Code:
            return Code.UNAVAILABLE

        def details(self) -> str:
            return "gone"

        # typeshed has a _Metadatum class here; gRPC gives (key, value) pairs.
        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
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
    assert "is DEAD after attempt 3 of 0: SMTP 550" in str(failed)
    assert "redrive it" in str(failed)

    redriven = Task.from_proto(
        task_pb2.Task(
            id="t2",
            type="send",
            state=task_pb2.TASK_STATE_DEAD,
            attempt=6,
            max_attempts=3,
            uncounted_attempts=3,
            last_error="SMTP 550",
        )
    )
    assert "is DEAD after attempt 3 of 3 (6 in all): SMTP 550" in str(TaskFailedError(redriven))

    cancelled = TaskCancelledError(dead)
    assert "was cancelled" in str(cancelled)

    timeout = WaitTimeoutError("t1", 2.5, dead)
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, ConveyorError)
    assert "after waiting 2.5s" in str(timeout)
    assert "no connected worker" not in str(timeout)


def test_wait_timeout_names_an_unserved_task() -> None:
    waiting = Task.from_proto(
        task_pb2.Task(id="t1", type="send-email", queue="mail", state=task_pb2.TASK_STATE_PENDING)
    )
    waiting = dataclasses.replace(waiting, unserved=True)
    message = str(WaitTimeoutError("t1", 30, waiting))
    assert (
        "still PENDING after waiting 30s: no connected worker serves type 'send-email'" in message
    )
    assert "on queue 'mail'; start one" in message
