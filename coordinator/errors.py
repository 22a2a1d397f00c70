"""Domain errors of the coordinator and their one mapping to gRPC statuses.

Every error leaves as a gRPC status with a ``google.rpc.ErrorInfo`` (domain ``conveyor.dev``,
reason the ``conveyor.v1.ErrorReason`` name without its prefix) and, where it helps,
``BadRequest`` field violations or ``RetryInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "conveyor.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its path (``tasks[2].type``) and what is wrong with it."""

    field: str
    description: str


class ConveyorError(Exception):
    """Root of the coordinator's domain errors; each subclass maps to one status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "UNSPECIFIED"
    retry_after: float | None = None
    """Seconds the caller should wait before retrying, sent as RetryInfo; None if pointless."""

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}


class InvalidArgument(ConveyorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {summary}{more}")
        self.violations = violations


class TaskNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} does not exist", metadata={"task_id": task_id})


class IdempotencyKeyConflict(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "IDEMPOTENCY_KEY_CONFLICT"

    def __init__(self, key: str, existing_task_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} is already used by task {existing_task_id} with a "
            "different request; use a new key, or resend the original request unchanged",
            metadata={"idempotency_key": key, "task_id": existing_task_id},
        )


class InvalidState(ConveyorError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INVALID_STATE"

    def __init__(self, task_id: str, state: str, action: str) -> None:
        super().__init__(
            f"cannot {action} task {task_id}: it is {state}",
            metadata={"task_id": task_id, "state": state},
        )


class ScheduleNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "SCHEDULE_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} does not exist", metadata={"name": name})


class ScheduleAlreadyExists(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "SCHEDULE_ALREADY_EXISTS"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a schedule named {name!r} exists already; pick another name, or change it "
            "with UpdateSchedule",
            metadata={"name": name},
        )


class EtagMismatch(ConveyorError):
    code = grpc.StatusCode.ABORTED
    reason = "ETAG_MISMATCH"

    def __init__(self, what: str, sent: str, current: str) -> None:
        super().__init__(
            f"{what} changed since it was read (etag {sent!r}, now {current!r}); read it "
            "again and retry",
            metadata={"etag": current},
        )


class NotLeader(ConveyorError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NOT_LEADER"

    def __init__(self, leader_address: str = "") -> None:
        where = f"; the leader is at {leader_address}" if leader_address else ""
        super().__init__(
            f"this coordinator is not the leader{where}",
            metadata={"leader_address": leader_address},
        )
        # A known leader can be asked at once; an unknown one is being elected, which
        # takes a fraction of the election TTL.
        self.retry_after = 0.05 if leader_address else 0.25


class StoreUnavailable(ConveyorError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"
    retry_after = 1.0

    def __init__(self, detail: str) -> None:
        super().__init__(f"PostgreSQL is unavailable ({detail}); retry shortly")


class Overloaded(ConveyorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"
    retry_after = 0.2

    def __init__(self, what: str) -> None:
        super().__init__(f"the coordinator is overloaded ({what}); retry with backoff")


class Fenced(ConveyorError):
    """This coordinator's epoch is no longer the leader's: it must not write."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "NOT_LEADER"
    retry_after = 0.5

    def __init__(self, own_epoch: int, current_epoch: int | None) -> None:
        super().__init__(
            f"leadership lost: own epoch {own_epoch}, current epoch {current_epoch}",
            metadata={"leader_address": ""},
        )


class ProtocolViolation(ConveyorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "PROTOCOL_VIOLATION"


def to_status(error: ConveyorError) -> grpc.Status:
    """Builds the rich gRPC status for a domain error."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if isinstance(error, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=details
    )
    return rpc_status.to_status(status)
