"""Domain errors of the coordinator, and the one table that turns any exception into a status.

Every error leaves as a gRPC status with a ``google.rpc.ErrorInfo`` (domain ``conveyor.dev``,
reason the ``conveyor.v1.ErrorReason`` name without its ``ERROR_REASON_`` prefix) and, where
it helps, ``BadRequest`` field violations, ``QuotaFailure`` or ``RetryInfo``. Handlers only
raise: the error interceptor (``api/interceptors/errors.py``) calls :func:`to_status`.

``ErrorReason`` is the catalog: each value (but UNSPECIFIED) has exactly one
:class:`ConveyorError` subclass here, which names it in ``reason`` (a unit test walks the
enum). Store failures are not domain errors; :func:`domain_error` maps them:

=====================================================  =========================================
exception                                              becomes
=====================================================  =========================================
``ConveyorError``                                      itself
``Fenced`` (this coordinator's epoch is stale)          NOT_LEADER (UNAVAILABLE, RetryInfo)
PostgreSQL restarting / shutting down (57P01 57P02      STORE_UNAVAILABLE (UNAVAILABLE, RetryInfo)
57P03), too many connections or no resources (53*),
deadlock (40P01), serialization failure (40001),
lock not available (55P03), a statement timeout
(57014), a lost connection (08*, OSError, asyncpg
InterfaceError, TimeoutError)
a value PostgreSQL refused (22*, 54*): validation       INVALID_ARGUMENT (the request alone)
should have caught it, so it is logged as a bug
anything else                                          INTERNAL, logged with its traceback
=====================================================  =========================================

A lost connection while a write may have been committing is not "retry shortly": the
write paths raise :class:`OutcomeUnknown` for it themselves (see ``store/db.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import asyncpg
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.coordinator import bounds
from conveyor.v1 import errors_pb2

DOMAIN = "conveyor.dev"
_REASON_PREFIX = "ERROR_REASON_"

_log = logging.getLogger("conveyor.coordinator.errors")


def reason_name(reason: errors_pb2.ErrorReason.ValueType) -> str:
    """The wire name of an ErrorReason value: ``TASK_NOT_FOUND`` for ERROR_REASON_TASK_NOT_FOUND."""
    return errors_pb2.ErrorReason.Name(reason).removeprefix(_REASON_PREFIX)


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its path (``tasks[2].type``) and what is wrong with it."""

    field: str
    description: str


class ConveyorError(Exception):
    """Root of the coordinator's domain errors; each subclass names one ErrorReason."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[errors_pb2.ErrorReason.ValueType] = errors_pb2.ERROR_REASON_UNSPECIFIED
    retry_after: float | None = None
    """Seconds the caller should wait before retrying, sent as RetryInfo; None if pointless."""

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}

    def extra_details(self) -> Sequence[Message]:
        """google.rpc detail messages besides ErrorInfo and RetryInfo."""
        return ()


class InvalidArgument(ConveyorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {summary}{more}")
        self.violations = list(violations)

    def extra_details(self) -> Sequence[Message]:
        return [_bad_request(self.violations)]


class TaskNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_TASK_NOT_FOUND

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} does not exist", metadata={"task_id": task_id})


class DependencyNotFound(TaskNotFound):
    def __init__(self, task_id: str) -> None:
        ConveyorError.__init__(
            self,
            f"task {task_id}, listed in after, does not exist (a task of another tenant "
            "counts as missing): submit it first, or refer to a task of the same "
            "SubmitTasks request with after_refs",
            metadata={"task_id": task_id},
        )


class IdempotencyKeyConflict(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = errors_pb2.ERROR_REASON_IDEMPOTENCY_KEY_CONFLICT

    def __init__(
        self, key: str, existing_task_id: str, *, message: str = "", request_id: str = ""
    ) -> None:
        metadata = {"task_id": existing_task_id}
        metadata.update({"request_id": request_id} if request_id else {"idempotency_key": key})
        super().__init__(
            message
            or f"idempotency key {key!r} is already used by task {existing_task_id} with a "
            "different request; use a new key, or resend the original request unchanged",
            metadata=metadata,
        )

    @classmethod
    def for_request_id(cls, request_id: str) -> IdempotencyKeyConflict:
        """A client-made request_id that is already the id of a different request's task."""
        return cls(
            "",
            request_id,
            request_id=request_id,
            message=f"request_id {request_id} is already the id of a task submitted with a "
            "different request; make a new request_id for each new task (the client library "
            "does), and resend only the original request unchanged",
        )


class InvalidState(ConveyorError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_INVALID_STATE

    def __init__(self, task_id: str, state: str, action: str) -> None:
        super().__init__(
            f"cannot {action} task {task_id}: it is {state}",
            metadata={"task_id": task_id, "state": state},
        )


class NotLeader(ConveyorError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_NOT_LEADER

    def __init__(self, leader_address: str = "") -> None:
        where = f"; the leader is at {leader_address}" if leader_address else ""
        super().__init__(
            f"this coordinator is not the leader{where}",
            metadata={"leader_address": leader_address},
        )
        # A known leader can be asked at once; an unknown one is being elected, which
        # takes a fraction of the election TTL.
        self.retry_after = 0.05 if leader_address else 0.25


class Overloaded(ConveyorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_OVERLOADED
    retry_after = 0.2

    def __init__(self, what: str) -> None:
        super().__init__(f"the coordinator is overloaded ({what}); retry with backoff")


class StoreUnavailable(ConveyorError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_STORE_UNAVAILABLE
    retry_after = 1.0

    def __init__(self, detail: str) -> None:
        super().__init__(f"PostgreSQL is unavailable ({detail}); retry shortly")


class ProtocolViolation(ConveyorError):
    """The worker broke the protocol; the stream is closed (BadRequest names the fields)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = errors_pb2.ERROR_REASON_PROTOCOL_VIOLATION

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)

    def extra_details(self) -> Sequence[Message]:
        return [_bad_request(self.violations)] if self.violations else ()


class ScheduleNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_SCHEDULE_NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} does not exist", metadata={"name": name})


class ScheduleAlreadyExists(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = errors_pb2.ERROR_REASON_SCHEDULE_ALREADY_EXISTS

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a schedule named {name!r} exists already; pick another name, or change it "
            "with UpdateSchedule",
            metadata={"name": name},
        )


class EtagMismatch(ConveyorError):
    code = grpc.StatusCode.ABORTED
    reason = errors_pb2.ERROR_REASON_ETAG_MISMATCH

    def __init__(self, what: str, sent: str, current: str) -> None:
        super().__init__(
            f"{what} changed since it was read (etag {sent!r}, now {current!r}); read it "
            "again and retry",
            metadata={"etag": current},
        )


class LeaseNotHeld(ConveyorError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_LEASE_NOT_HELD

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"the attempt does not hold the lease of task {task_id}: the task finished, was "
            "cancelled or was leased again, or the caller is not the worker process it was "
            "leased to; a later attempt does the work",
            metadata={"task_id": task_id},
        )


class LockNotHeld(ConveyorError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = errors_pb2.ERROR_REASON_LOCK_NOT_HELD

    def __init__(self, name: str) -> None:
        super().__init__(
            f"lock {name!r} is not held with this handle: its TTL ran out or another holder "
            "took it; write nothing more under its fencing token and acquire it again",
            metadata={"name": name},
        )


class OutcomeUnknown(ConveyorError):
    """The store connection broke while a write was committing: it may have been applied.

    UNAVAILABLE (the coordinator could not finish), but without RetryInfo: a blind resend
    may duplicate the write; resending is safe only with an idempotency key.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = errors_pb2.ERROR_REASON_OUTCOME_UNKNOWN

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the connection to PostgreSQL broke while the write was committing ({detail}): "
            "it may or may not have been applied. Read the state back, or resend with an "
            "idempotency key (a resend without one may duplicate it)"
        )


class WorkerIdInUse(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = errors_pb2.ERROR_REASON_WORKER_ID_IN_USE

    # Says nothing of the session that holds the id: what a Hello could repeat to pass
    # for it is nobody else's business (and proves nothing since the resume token).
    def __init__(self, worker_id: str, liveness_timeout: float) -> None:
        super().__init__(
            f"worker id {worker_id!r} is in use by a live worker session; give each worker "
            f"process its own id (the SDK's default does). A reconnect of the same process "
            f"presents its resume token and is not refused. If the process that holds it has "
            f"exited, its session ends within {liveness_timeout:.0f}s",
            metadata={"worker_id": worker_id},
        )


class QuotaExceeded(ConveyorError):
    """A limit was reached; nothing was written. QuotaFailure names the limit.

    ``retry_after`` None (no RetryInfo) for a limit that waiting does not lift (a payload
    too large, a schedule count): the message says what to change instead.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_QUOTA_EXCEEDED

    def __init__(self, subject: str, description: str, retry_after: float | None) -> None:
        advice = "retry later" if retry_after is not None else "retrying will not help"
        super().__init__(f"{description}; nothing was written, {advice}")
        self.subject = subject
        self.description = description
        self.retry_after = retry_after

    def extra_details(self) -> Sequence[Message]:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=self.subject, description=self.description
        )
        return [error_details_pb2.QuotaFailure(violations=[violation])]


class Unauthenticated(ConveyorError):
    """The call carries no valid API key. ``problem`` says which way, in one word; the
    message never repeats what the caller sent (it may be someone's secret)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = errors_pb2.ERROR_REASON_UNAUTHENTICATED

    def __init__(self, problem: str, message: str, *, key_id: str = "") -> None:
        metadata = {"problem": problem}
        if key_id:
            metadata["key_id"] = key_id
        super().__init__(message, metadata=metadata)
        self.problem = problem


class PermissionDenied(ConveyorError):
    """The API key lacks the scope the method needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = errors_pb2.ERROR_REASON_PERMISSION_DENIED

    def __init__(self, key_id: str, scope: str, method: str) -> None:
        super().__init__(
            f"API key {key_id} lacks the {scope!r} scope, which {method} needs; use a key "
            f"with it (an admin creates one with: conveyor keys create --scope {scope} ...)",
            metadata={"key_id": key_id, "scope": scope},
        )
        self.scope = scope


class ApiKeyNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_API_KEY_NOT_FOUND

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"no API key has the id {key_id!r} (conveyor keys list shows them)",
            metadata={"key_id": key_id},
        )


class WebhookNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_WEBHOOK_NOT_FOUND

    def __init__(self, webhook_id: str) -> None:
        super().__init__(
            f"no webhook subscription has the id {webhook_id!r} (conveyor webhooks list "
            "shows them)",
            metadata={"webhook_id": webhook_id},
        )


class WatchTooSlow(ConveyorError):
    """A WatchTasks stream fell too far behind: ended rather than buffering without bound."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = errors_pb2.ERROR_REASON_WATCH_TOO_SLOW

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"this WatchTasks stream was ended: {detail}; read it faster or narrow its "
            "filter, reopen it, and read the current state with ListTasks"
        )


class TaskTypeNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_TASK_TYPE_NOT_FOUND

    def __init__(self, type_: str) -> None:
        super().__init__(
            f"no definition of task type {type_!r} (conveyor types list shows them)",
            metadata={"type": type_},
        )


class WorkerNotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = errors_pb2.ERROR_REASON_WORKER_NOT_FOUND

    def __init__(self, worker_id: str, tenant: str = "") -> None:
        whose = f" of tenant {tenant!r}" if tenant else ""
        super().__init__(
            f"no worker {worker_id!r}{whose} is connected to the leader (conveyor status "
            "lists those that are)",
            metadata={"worker_id": worker_id},
        )


class Fenced(Exception):
    """This coordinator's epoch is no longer the leader's: it must not write.

    Internal: the loops that meet it step down; an API call that meets it answers
    NOT_LEADER (see :func:`domain_error`).
    """

    def __init__(self, own_epoch: int) -> None:
        super().__init__(f"leadership lost: epoch {own_epoch} is no longer current")
        self.own_epoch = own_epoch


# -- store failures ------------------------------------------------------------------------

# SQLSTATEs after which the same request may well succeed shortly: the server is
# restarting or short of resources, or this transaction lost a race. (Class 08, a lost
# connection, is recognised by prefix.)
RETRYABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: the server is stopping or restarting
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up or in recovery
        "57014",  # query_canceled: our statement_timeout
        "53000",  # insufficient_resources
        "53100",  # disk_full
        "53200",  # out_of_memory
        "53300",  # too_many_connections
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
    }
)
# Classes of values PostgreSQL refuses (data exceptions, program limits): the request's own.
_REFUSED_VALUE_CLASSES = ("22", "54")


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def is_connection_loss(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection broke (or timed out) mid-conversation.

    After such an error a statement that was on its way, or a COMMIT, may or may not
    have been applied by the server.
    """
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    state = _sqlstate(exc)
    return state.startswith("08") or state in ("57P01", "57P02", "57014")


def rolled_back(exc: BaseException) -> bool:
    """Whether ``exc`` proves that the failed statement or transaction left no trace.

    True for errors the server reported about a statement while the connection stayed
    up: it rolled the transaction back. False for connection losses, where it is unknown.
    """
    return isinstance(exc, asyncpg.PostgresError) and not is_connection_loss(exc)


def refused_row(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL refusing the values of a row (a data exception, an
    integrity constraint, a program limit: SQLSTATE classes 22, 23, 54), with nothing
    written: in a sweep over all tenants, one bad row's doing, to be found and set aside."""
    return rolled_back(exc) and _sqlstate(exc).startswith((*_REFUSED_VALUE_CLASSES, "23"))


def is_store_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage of (or refusal by) the store, rather than a bug here."""
    return isinstance(exc, asyncpg.PostgresError) or is_connection_loss(exc)


def domain_error(exc: BaseException) -> ConveyorError | None:
    """The domain error an exception stands for (the table in the module docstring).

    None for an exception that is no known failure: a bug, which leaves as INTERNAL.
    """
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, Fenced):
        return NotLeader("")
    state = _sqlstate(exc)
    if state.startswith(_REFUSED_VALUE_CLASSES):
        _log.error(
            "PostgreSQL refused a value that validation let through (a bug: validate it): %s",
            exc,
        )
        return InvalidArgument([FieldViolation("request", f"refused by the database: {exc}")])
    if state == "57014":
        return StoreUnavailable(f"a statement timed out: {exc}")
    if is_connection_loss(exc) or state in RETRYABLE_SQLSTATES:
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return None


# -- the status ----------------------------------------------------------------------------


# A status travels in trailers, of which a client takes 8 KiB (gRPC's default) and refuses
# the rest as RESOURCE_EXHAUSTED: a status built from an oversized request (a 10 KB field
# echoed in a violation, a batch of a thousand bad tasks) would never arrive. Texts are
# cut to these many bytes (percent-encoded, a message byte takes up to 3 characters) and
# the violations to the first few, which keeps a status within about 6 KiB.
MAX_MESSAGE_BYTES = 400
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 200


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes, marked when cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "..."


def _bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    shown = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_cut(v.field, MAX_FIELD_BYTES),
            description=_cut(v.description, MAX_DESCRIPTION_BYTES),
        )
        for v in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        shown.append(
            error_details_pb2.BadRequest.FieldViolation(
                field="request",
                description=f"and {len(violations) - MAX_VIOLATIONS} more violations",
            )
        )
    return error_details_pb2.BadRequest(field_violations=shown)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: ConveyorError) -> grpc.Status:
    """The rich gRPC status of a domain error; its RetryInfo within 0 and
    ``bounds.RETRY_AFTER_MAX``, whatever the error says."""
    info = error_details_pb2.ErrorInfo(
        reason=reason_name(error.reason), domain=DOMAIN, metadata=error.metadata
    )
    details = [_pack(info), *(_pack(d) for d in error.extra_details())]
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(bounds.retry_delay(error.retry_after) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=_cut(error.message, MAX_MESSAGE_BYTES),
        details=details,
    )
    return rpc_status.to_status(status)


def internal_status(request_id: str) -> grpc.Status:
    """The status of a bug: INTERNAL, pointing at the coordinator's log."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error in the coordinator (request {request_id}); its log has the "
        "traceback. This is a bug: please report it",
    )
    return rpc_status.to_status(status)
