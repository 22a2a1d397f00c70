"""Exceptions raised by the Conveyor client.

Every exception the client raises on purpose derives from one root, so
``except ConveyorError`` catches them all::

    ConveyorError
    ├── RPCError                    a call to the coordinator failed (.code, .reason, .retry_after)
    │   ├── InvalidArgumentError    a request field is invalid (.field_violations)
    │   ├── TaskNotFoundError       no such task (.task_id)
    │   ├── IdempotencyConflictError
    │   │                           the key is taken by another request (.existing_task_id)
    │   ├── InvalidStateError       illegal transition for the task's state (.task_id, .state)
    │   ├── UnavailableError        coordinator or its store unreachable (.retry_after)
    │   │   └── NotLeaderError      redirects to the leader ran out (.leader_address)
    │   ├── OverloadedError         the coordinator sheds load (.retry_after)
    │   └── DeadlineExceededError   the call ran past its deadline
    ├── TaskFailedError             the awaited task is DEAD (.task, .last_error)
    ├── TaskCancelledError          the awaited task was cancelled (.task)
    └── WaitTimeoutError            wait() gave up; also a builtin TimeoutError (.task_id, .task)

The coordinator attaches a ``google.rpc.ErrorInfo`` (domain ``conveyor.dev``) to every error
status, plus ``RetryInfo`` or ``BadRequest`` where they apply (see docs/contracts.md).
:func:`error_from_rpc` turns such a status into one of the classes above through the single
table ``_ERROR_TABLE``; everything else becomes a plain :class:`RPCError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, cast

import grpc
from google.protobuf.message import DecodeError

# googleapis-common-protos ships no type stubs; the messages are used dynamically here.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from conveyor.client._models import Task, TaskState

# grpcio-status attaches the serialized google.rpc.Status under this trailing metadata key.
# grpc_status.rpc_status.from_call() reads it too, but it needs a call object; an
# AioRpcError only carries the trailing metadata, so the client reads the key itself.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

# The ErrorInfo domain the coordinator stamps on its errors.
ERROR_DOMAIN = "conveyor.dev"

__all__ = [
    "ConveyorError",
    "DeadlineExceededError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidStateError",
    "NotLeaderError",
    "OverloadedError",
    "RPCError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskNotFoundError",
    "UnavailableError",
    "WaitTimeoutError",
]


class ConveyorError(Exception):
    """Root of every exception the Conveyor client raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        """The human-readable message: what went wrong and what to do about it."""
        return str(self.args[0]) if self.args else ""

    def _append(self, text: str) -> None:
        # Context known only to the caller that raises (for example "this submit was not
        # retried") belongs in str(err), not just in a traceback note, because many
        # applications only ever log str(err).
        self.args = (f"{self.message} {text}",)


@dataclass(frozen=True, slots=True)
class _StatusInfo:
    """Everything the client reads off a failed call, in one place."""

    code: grpc.StatusCode
    message: str
    address: str | None = None
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    field_violations: list[tuple[str, str]] = field(default_factory=list)


class RPCError(ConveyorError):
    """A call to the coordinator failed with a gRPC status.

    Attributes:
        code: The gRPC status code.
        reason: The ``ErrorInfo`` reason (``"TASK_NOT_FOUND"``, ...), or ``None`` when the
            status carried no ``ErrorInfo`` (for example a connection failure).
        metadata: The ``ErrorInfo`` metadata (``task_id``, ``leader_address``, ...).
        retry_after: Seconds the server asked the client to wait (``RetryInfo``), or ``None``.
        server_message: The status message exactly as the server sent it.
        address: The coordinator address the call went to, when known.
    """

    # What to do about it; subclasses override. Kept beside the class so the advice
    # cannot drift from the error it belongs to.
    _hint: ClassVar[str] = "Check the coordinator's logs for the cause."

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        server_message: str = "",
        address: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after
        self.server_message = server_message
        self.address = address

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        """Builds the error from a parsed status; subclasses add their own fields."""
        return cls(cls._describe(info), **_common_kwargs(info))

    @classmethod
    def _describe(cls, info: _StatusInfo) -> str:
        where = f" from {info.address}" if info.address else ""
        tag = f"{info.code.name}/{info.reason}" if info.reason else info.code.name
        return f"{info.message or 'the call failed'} ({tag}{where}). {cls._hint}"


def _common_kwargs(info: _StatusInfo) -> dict[str, Any]:
    return {
        "code": info.code,
        "reason": info.reason,
        "metadata": info.metadata,
        "retry_after": info.retry_after,
        "server_message": info.message,
        "address": info.address,
    }


def _retry_phrase(retry_after: float | None) -> str:
    if retry_after is None:
        return "Retry shortly"
    return f"Retry after {retry_after:g}s"


class InvalidArgumentError(RPCError):
    """The request was rejected because some field is invalid.

    Attributes:
        field_violations: ``(field, description)`` pairs from the ``BadRequest`` details;
            fields are request paths such as ``"type"`` or ``"tasks[3].queue"``.
    """

    _hint = "Fix the named fields and send the request again."

    def __init__(
        self,
        message: str,
        *,
        field_violations: list[tuple[str, str]] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])

    def _shift_task_index(self, offset: int) -> None:
        # submit_many() sends batches; the server numbers `tasks[i]` within its batch,
        # the caller thinks in positions of the whole list it passed.
        if not offset or not self.field_violations:
            return
        self.field_violations = [
            (_TASK_INDEX.sub(lambda m: f"tasks[{int(m[1]) + offset}]", f, count=1), d)
            for f, d in self.field_violations
        ]
        self.args = (_violations_message(self.field_violations, self._hint),)

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        if info.field_violations:
            message = _violations_message(info.field_violations, cls._hint)
        else:
            message = cls._describe(info)
        return cls(message, field_violations=info.field_violations, **_common_kwargs(info))


_TASK_INDEX = re.compile(r"^tasks\[(\d+)\]")


def _violations_message(violations: list[tuple[str, str]], hint: str) -> str:
    listed = "; ".join(f"{f}: {d}" for f, d in violations)
    return f"invalid request: {listed}. {hint}"


class TaskNotFoundError(RPCError):
    """No task has the given id (for this API key's tenant).

    Attributes:
        task_id: The id that was looked up, when the server named it.
    """

    _hint = "Check the id, and that the API key belongs to the tenant that submitted the task."

    def __init__(self, message: str, *, task_id: str | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.task_id = task_id

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        task_id = info.metadata.get("task_id") or None
        message = f"task {task_id!r} not found. {cls._hint}" if task_id else cls._describe(info)
        return cls(message, task_id=task_id, **_common_kwargs(info))


class IdempotencyConflictError(RPCError):
    """The idempotency key is already taken by a task submitted with a different request.

    Attributes:
        idempotency_key: The conflicting key.
        existing_task_id: The id of the task that holds the key.
    """

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: str | None = None,
        existing_task_id: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.idempotency_key = idempotency_key
        self.existing_task_id = existing_task_id

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        key = info.metadata.get("idempotency_key") or None
        existing = info.metadata.get("task_id") or None
        message = (
            f"idempotency key {key!r} is already used by task {existing!r}, submitted with a "
            f"different request. Use a new key for a different task, or fetch the existing "
            f"one with get({existing!r})."
        )
        return cls(message, idempotency_key=key, existing_task_id=existing, **_common_kwargs(info))


class InvalidStateError(RPCError):
    """The transition is illegal in the task's current state.

    For example cancelling a finished task, or retrying a task that is not DEAD.

    Attributes:
        task_id: The task, when the server named it.
        state: Its current state, when the server named it.
    """

    _hint = "cancel() applies only to unfinished tasks and retry() only to DEAD tasks."

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        state: TaskState | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.task_id = task_id
        self.state = state

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        from conveyor.client._models import parse_state_name

        task_id = info.metadata.get("task_id") or None
        state = parse_state_name(info.metadata.get("state", ""))
        if task_id and state is not None:
            message = f"task {task_id!r} is {state.name}: {info.message}. {cls._hint}"
        else:
            message = cls._describe(info)
        return cls(message, task_id=task_id, state=state, **_common_kwargs(info))


class UnavailableError(RPCError):
    """The coordinator could not serve the call: unreachable, or its store is down.

    ``retry_after`` says how long the server asked to wait, when it said.
    """

    @classmethod
    def _describe(cls, info: _StatusInfo) -> str:
        where = info.address or "the coordinator"
        if info.reason == "STORE_UNAVAILABLE":
            return (
                f"{where} cannot reach its store (PostgreSQL): {info.message}. "
                f"{_retry_phrase(info.retry_after)}; if it persists, check the database."
            )
        return (
            f"{where} is unavailable: {info.message}. Check that the coordinator is running "
            f"and reachable from here, or pass the addresses of more coordinators."
        )


class NotLeaderError(UnavailableError):
    """The coordinator asked is not the leader, and following redirects did not help.

    The client follows ``NOT_LEADER`` redirects by itself; this surfaces only when they
    run out (an election in progress, or a leader address unreachable from here).

    Attributes:
        leader_address: Where the server said the leader is; ``None`` while unknown.
    """

    def __init__(
        self, message: str, *, leader_address: str | None = None, **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.leader_address = leader_address

    @classmethod
    def _from_status(cls, info: _StatusInfo) -> RPCError:
        leader = info.metadata.get("leader_address") or None
        where = info.address or "the coordinator"
        known = f"says the leader is {leader}" if leader else "does not know the leader yet"
        message = (
            f"{where} is not the leader and {known}. {_retry_phrase(info.retry_after)}; if it "
            f"persists, check that the leader's address is reachable from this host."
        )
        return cls(message, leader_address=leader, **_common_kwargs(info))


class OverloadedError(RPCError):
    """The coordinator is shedding load; ``retry_after`` says when to try again."""

    @classmethod
    def _describe(cls, info: _StatusInfo) -> str:
        return (
            f"the coordinator is overloaded: {info.message}. {_retry_phrase(info.retry_after)}, "
            f"or send fewer, larger requests (submit_many)."
        )


class DeadlineExceededError(RPCError):
    """The call did not complete before its deadline (the client's ``timeout``)."""

    _hint = (
        "Raise the client's timeout= if the coordinator is just slow, or check its health; "
        "a submit that timed out may still have been written (use idempotency keys)."
    )


class TaskFailedError(ConveyorError):
    """The awaited task ended DEAD: its attempts ran out or it failed non-retryably.

    Attributes:
        task: The task in its final state.
        last_error: The error of its last attempt.
    """

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"task {task.id!r} ({task.type}) is DEAD after {task.attempt} attempt(s): "
            f"{task.last_error or 'no error recorded'}. Inspect it with "
            f"get_with_attempts({task.id!r}), or redrive it with retry({task.id!r})."
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
    :class:`TimeoutError`, so code catching that keeps working.

    Attributes:
        task_id: The awaited task.
        timeout: How long the client waited, in seconds.
        task: The last state seen, or ``None`` when none was seen.
    """

    def __init__(self, task_id: str, timeout: float, task: Task | None = None) -> None:
        state = f"still {task.state.name}" if task is not None else "not seen yet"
        ConveyorError.__init__(
            self,
            f"task {task_id!r} is {state} after waiting {timeout:g}s. It keeps running: wait "
            f"again with a longer timeout, or cancel({task_id!r}) it.",
        )
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


# The single mapping from (gRPC code, ErrorInfo reason) to exception class. A reason of
# None matches any status with that code whose reason has no entry of its own (including
# statuses without ErrorInfo, such as connection failures raised by gRPC itself).
# RESOURCE_EXHAUSTED has no None entry on purpose: gRPC raises it locally for oversized
# messages, which is no sign of an overloaded coordinator.
_ERROR_TABLE: dict[tuple[grpc.StatusCode, str | None], type[RPCError]] = {
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"): InvalidArgumentError,
    (grpc.StatusCode.INVALID_ARGUMENT, None): InvalidArgumentError,
    (grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND"): TaskNotFoundError,
    (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_CONFLICT"): IdempotencyConflictError,
    (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE"): InvalidStateError,
    (grpc.StatusCode.UNAVAILABLE, "NOT_LEADER"): NotLeaderError,
    (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"): UnavailableError,
    (grpc.StatusCode.UNAVAILABLE, None): UnavailableError,
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"): OverloadedError,
    (grpc.StatusCode.DEADLINE_EXCEEDED, None): DeadlineExceededError,
}


def error_from_rpc(err: grpc.RpcError, *, address: str | None = None) -> RPCError:
    """Converts a failed gRPC call (sync or aio) into the matching :class:`RPCError`."""
    info = parse_status(err, address=address)
    cls = _ERROR_TABLE.get((info.code, info.reason)) or _ERROR_TABLE.get((info.code, None))
    return (cls or RPCError)._from_status(info)


def parse_status(err: grpc.RpcError, *, address: str | None = None) -> _StatusInfo:
    """Reads the code, message and ``google.rpc`` details off a failed call."""
    # Both grpc.Call (sync) and AioRpcError expose code()/details()/trailing_metadata();
    # grpc.RpcError itself declares none of them, hence getattr.
    code = cast(grpc.StatusCode, _call_attr(err, "code") or grpc.StatusCode.UNKNOWN)
    message = str(_call_attr(err, "details") or "")
    status = _rich_status(_call_attr(err, "trailing_metadata"))
    if status is None:
        return _StatusInfo(code=code, message=message, address=address)

    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason or None, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta() / timedelta(seconds=1)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return _StatusInfo(
        code=code,
        message=message or status.message,
        address=address,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_after=retry_after,
        field_violations=violations,
    )


def _call_attr(err: grpc.RpcError, name: str) -> object:
    getter = getattr(err, name, None)
    return getter() if callable(getter) else None


def _rich_status(trailing_metadata: object) -> status_pb2.Status | None:
    if not trailing_metadata:
        return None
    # aio Metadata and the sync tuple of pairs both iterate as (key, value).
    for key, value in trailing_metadata:  # type: ignore[attr-defined]
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                # A garbled detail must not hide the status code itself.
                return None
    return None
