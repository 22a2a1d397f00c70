"""The exceptions of the Conveyor SDK, and the one table that maps error statuses to them.

Every exception the SDK raises on purpose derives from one root, so
``except ConveyorError`` catches them all::

    ConveyorError
    ├── RPCError                     a call failed with a gRPC status (.code, .reason, .retry_after)
    │   ├── InvalidArgumentError     a request field is invalid (.field_violations)
    │   ├── TaskNotFoundError        no such task (.task_id)
    │   ├── IdempotencyConflictError the key is taken by another request (.existing_task_id)
    │   ├── InvalidStateError        illegal transition in the task's state (.task_id, .state)
    │   ├── UnavailableError         coordinator unreachable, or it cannot serve (.retry_after)
    │   │   ├── NotLeaderError       redirects to the leader ran out (.leader_address)
    │   │   └── StoreUnavailableError  the coordinator cannot reach PostgreSQL
    │   ├── OverloadedError          the coordinator sheds load (.retry_after)
    │   ├── QuotaExceededError       a limit was reached (.violations, .retry_after)
    │   ├── OutcomeUnknownError      a write may or may not have been applied
    │   ├── ProtocolViolationError   the coordinator refused a worker's message
    │   ├── ScheduleNotFoundError    no such schedule (.name)
    │   ├── ScheduleAlreadyExistsError  the schedule name is taken (.name)
    │   ├── EtagMismatchError        changed since it was read (.etag)
    │   ├── WorkerIdInUseError       another worker process uses this id (.worker_id)
    │   ├── UnauthenticatedError     no valid API key: missing, malformed, unknown, expired, revoked
    │   ├── PermissionDeniedError    the API key lacks the scope (.scope, .key_id)
    │   ├── ApiKeyNotFoundError      no API key has the id (.key_id)
    │   ├── RateLimitNotFoundError   no rate limit has the queue and type (.queue, .type)
    │   ├── LeaseNotHeldError        the attempt lost its task's lease (.task_id)
    │   ├── LockNotHeldError         the lock was lost: TTL ran out, taken over (.name)
    │   ├── WorkerNotFoundError      no worker with the id is connected (.worker_id)
    │   ├── WebhookNotFoundError     no webhook subscription has the id (.webhook_id)
    │   ├── WatchTooSlowError        a WatchTasks stream fell too far behind and was ended
    │   ├── TaskTypeNotFoundError    the tenant has no definition of the task type (.type)
    │   └── DeadlineExceededError    the call ran past its deadline
    ├── TaskFailedError              (client) the awaited task is DEAD (.task, .last_error)
    ├── TaskCancelledError           (client) the awaited task was cancelled (.task)
    ├── WaitTimeoutError             (client) wait() gave up; also a TimeoutError (.task_id, .task)
    ├── TLSConfigError               a TLS file is unusable (missing, not PEM, mismatched, ...)
    ├── EncryptionError              payload encryption failed or is misconfigured
    │   ├── KeyRingError             a key ring or key file is invalid
    │   └── DecryptionError          a payload or result does not open (key, tampering, binding)
    │       └── KeyUnavailableError  its key is not in the ring (.key_id): another may hold it
    └── NoHandlersError              (worker) a Worker without handlers cannot start

Two exceptions stand apart on purpose: ``NonRetryableError`` is raised by handlers, not
by the SDK, and ``WorkerLoadError`` (``load_worker`` cannot find the Worker) is a usage
error of the command line.

The coordinator attaches a ``google.rpc.ErrorInfo`` (domain ``conveyor.dev``, reason a
``conveyor.v1.ErrorReason`` name without its prefix) to every error status, plus
``RetryInfo``, ``BadRequest`` or ``QuotaFailure`` where they apply. :func:`error_from_rpc`
turns a status into one of the classes above through :data:`ERROR_CLASSES`, keyed by the
``ErrorReason`` enum; a status without a reason (gRPC's own, such as a broken connection)
maps by its code, and anything else becomes a plain :class:`RPCError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, cast

import grpc
from google.protobuf.message import DecodeError

# googleapis-common-protos ships no type stubs (pyproject.toml lets mypy import it
# untyped); the messages are used dynamically here.
from google.rpc import error_details_pb2, status_pb2

from conveyor.v1 import errors_pb2

__all__ = [
    "ERROR_CLASSES",
    "ERROR_DOMAIN",
    "ApiKeyNotFoundError",
    "ConveyorError",
    "DeadlineExceededError",
    "EtagMismatchError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidStateError",
    "LeaseNotHeldError",
    "LockNotHeldError",
    "NotLeaderError",
    "OutcomeUnknownError",
    "OverloadedError",
    "PermissionDeniedError",
    "ProtocolViolationError",
    "QuotaExceededError",
    "RPCError",
    "RateLimitNotFoundError",
    "ScheduleAlreadyExistsError",
    "ScheduleNotFoundError",
    "StatusInfo",
    "StoreUnavailableError",
    "TaskNotFoundError",
    "TaskTypeNotFoundError",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchTooSlowError",
    "WebhookNotFoundError",
    "WorkerIdInUseError",
    "WorkerNotFoundError",
    "error_from_rpc",
    "parse_status",
]

# grpcio-status attaches the serialized google.rpc.Status under this trailing metadata key.
# grpc_status.rpc_status.from_call() reads it too, but it needs a call object; an
# AioRpcError only carries the trailing metadata, so the SDK reads the key itself.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: The ErrorInfo domain the coordinator stamps on its errors.
ERROR_DOMAIN = "conveyor.dev"

_REASON_PREFIX = "ERROR_REASON_"


class ConveyorError(Exception):
    """Root of every exception the Conveyor SDK raises on purpose."""

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
class StatusInfo:
    """Everything read off a failed call, in one place."""

    code: grpc.StatusCode
    message: str
    address: str | None = None
    #: The ErrorInfo reason (``"TASK_NOT_FOUND"``), only when it is in our domain.
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    #: ``(subject, description)`` of each ``QuotaFailure`` violation.
    quota_violations: list[tuple[str, str]] = field(default_factory=list)


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
    def _from_status(cls, info: StatusInfo) -> RPCError:
        """Builds the error from a parsed status; subclasses add their own fields."""
        return cls(cls._describe(info), **_common_kwargs(info))

    @classmethod
    def _describe(cls, info: StatusInfo) -> str:
        where = f" from {info.address}" if info.address else ""
        tag = f"{info.code.name}/{info.reason}" if info.reason else info.code.name
        return f"{info.message or 'the call failed'} ({tag}{where}). {cls._hint}"


def _common_kwargs(info: StatusInfo) -> dict[str, Any]:
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
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
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
    def _from_status(cls, info: StatusInfo) -> RPCError:
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

    def __init__(self, message: str, *, task_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.task_id = task_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        task_id = info.metadata.get("task_id") or None
        message = f"task {task_id!r} not found. {cls._hint}" if task_id else cls._describe(info)
        return cls(message, task_id=task_id, **_common_kwargs(info))


class IdempotencyConflictError(RPCError):
    """The idempotency key (or the request_id) is already taken by a task submitted with a
    different request.

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
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.idempotency_key = idempotency_key
        self.existing_task_id = existing_task_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        key = info.metadata.get("idempotency_key") or None
        existing = info.metadata.get("task_id") or None
        if info.metadata.get("request_id"):
            # A request_id (a client-made task id) reused for a different request.
            message = (
                f"request_id {existing} is already the id of a task submitted with a "
                f"different request. Make a new request_id for each new task."
            )
        else:
            message = (
                f"idempotency key {key!r} is already used by task {existing!r}, submitted "
                f"with a different request. Use a new key for a different task, or read the "
                f"existing task {existing!r}."
            )
        return cls(message, idempotency_key=key, existing_task_id=existing, **_common_kwargs(info))


class InvalidStateError(RPCError):
    """The transition is illegal in the task's current state.

    For example cancelling a finished task, or retrying a task that is not DEAD.

    Attributes:
        task_id: The task, when the server named it.
        state: Its current state (a ``TaskState`` name such as ``"SUCCEEDED"``), when the
            server named it.
    """

    _hint = "Only unfinished tasks can be cancelled, and only DEAD tasks retried."

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        state: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.task_id = task_id
        self.state = state

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        # The client's TaskState is a str enum of these names; the import is deferred
        # because the catalog sits below the client in the layering.
        from conveyor.client._models import parse_state_name

        task_id = info.metadata.get("task_id") or None
        state = parse_state_name(info.metadata.get("state", ""))
        if task_id and state is not None:
            message = f"task {task_id!r} is {state.name}: {info.message}. {cls._hint}"
        else:
            message = cls._describe(info)
        return cls(message, task_id=task_id, state=state, **_common_kwargs(info))


class UnavailableError(RPCError):
    """The coordinator could not serve the call: unreachable, or unable to right now.

    ``retry_after`` says how long the server asked to wait, when it said.
    """

    @classmethod
    def _describe(cls, info: StatusInfo) -> str:
        where = info.address or "the coordinator"
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

    def __init__(self, message: str, *, leader_address: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.leader_address = leader_address

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        leader = info.metadata.get("leader_address") or None
        where = info.address or "the coordinator"
        known = f"says the leader is {leader}" if leader else "does not know the leader yet"
        message = (
            f"{where} is not the leader and {known}. {_retry_phrase(info.retry_after)}; if it "
            f"persists, check that the leader's address is reachable from this host."
        )
        return cls(message, leader_address=leader, **_common_kwargs(info))


class StoreUnavailableError(UnavailableError):
    """The coordinator cannot reach its store (PostgreSQL); nothing was written."""

    @classmethod
    def _describe(cls, info: StatusInfo) -> str:
        where = info.address or "the coordinator"
        return (
            f"{where} cannot reach its store (PostgreSQL): {info.message}. "
            f"{_retry_phrase(info.retry_after)}; if it persists, check the database."
        )


class OverloadedError(RPCError):
    """The coordinator is shedding load; ``retry_after`` says when to try again."""

    @classmethod
    def _describe(cls, info: StatusInfo) -> str:
        return (
            f"the coordinator is overloaded: {info.message}. {_retry_phrase(info.retry_after)}, "
            f"or send fewer, larger requests (submit_many)."
        )


class QuotaExceededError(RPCError):
    """A limit was reached (the pending backlog, the submit rate); nothing was written.

    Attributes:
        violations: ``(subject, description)`` of each limit reached, from the status's
            ``google.rpc.QuotaFailure``.
        retry_after: When the server expects room again (``RetryInfo``), in seconds.
    """

    def __init__(
        self, message: str, *, violations: list[tuple[str, str]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.violations: list[tuple[str, str]] = list(violations or [])

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        limits = "; ".join(f"{s}: {d}" if d else s for s, d in info.quota_violations)
        advice = (
            f"{_retry_phrase(info.retry_after)}: the client waits and resends a submit by "
            f"itself while its timeout leaves room (retry_resource_exhausted=True: every call)."
            if info.retry_after is not None
            else "Waiting will not help: change the request."
        )
        message = (
            f"{info.message or 'a limit was reached'}"
            f"{f' ({limits})' if limits else ''}. Nothing was written. {advice}"
        )
        return cls(message, violations=info.quota_violations, **_common_kwargs(info))


class OutcomeUnknownError(RPCError):
    """The coordinator lost its store while a write committed: it may or may not be applied.

    The client resends such a call by itself only when that is safe (a submit carrying an
    idempotency key, its own or the caller's); otherwise it raises this. Read the state
    back (``get``, ``list``) before doing the change again.
    """

    _hint = (
        "The change may or may not have been applied: read the task back before repeating "
        "it. Submits with an idempotency key are safe to resend."
    )


class ProtocolViolationError(RPCError):
    """The coordinator refused a worker's message as a protocol violation (an SDK bug)."""

    _hint = "Upgrade the worker SDK to match the coordinator; report it if both are current."


class _ScheduleError(RPCError):
    """Base of the errors about one schedule, which the server names in metadata."""

    def __init__(self, message: str, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.name = name

    @classmethod
    def _named(cls, name: str, server_message: str) -> str:
        raise NotImplementedError

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        name = info.metadata.get("name") or None
        message = cls._describe(info) if name is None else cls._named(name, info.message)
        return cls(message, name=name, **_common_kwargs(info))


class ScheduleNotFoundError(_ScheduleError):
    """No schedule has the given name (for this API key's tenant).

    Attributes:
        name: The schedule name, when the server named it.
    """

    @classmethod
    def _named(cls, name: str, server_message: str) -> str:
        said = f" ({server_message})" if server_message else ""
        return f"no schedule named {name!r}{said}. List the schedules to see their names."


class ScheduleAlreadyExistsError(_ScheduleError):
    """A schedule with the name exists already.

    Attributes:
        name: The schedule name, when the server named it.
    """

    @classmethod
    def _named(cls, name: str, server_message: str) -> str:
        return (
            f"a schedule named {name!r} exists already. Pick another name, or change the "
            f"existing one with an update."
        )


class EtagMismatchError(RPCError):
    """The resource changed since it was read (its etag is no longer current).

    Attributes:
        etag: The current etag, when the server sent it.
    """

    _hint = "Read it again, check the change still applies, and send it with the new etag."

    def __init__(self, message: str, *, etag: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.etag = etag

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        etag = info.metadata.get("etag") or None
        return cls(cls._describe(info), etag=etag, **_common_kwargs(info))


class WorkerIdInUseError(RPCError):
    """Another live worker process already uses this worker id.

    A misconfiguration: two processes were given the same ``worker_id``. Retrying does
    not help, so the worker stops with this error.

    Attributes:
        worker_id: The id in use, when the server named it.
    """

    def __init__(self, message: str, *, worker_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.worker_id = worker_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        worker_id = info.metadata.get("worker_id") or None
        where = f" at {info.address}" if info.address else ""
        message = (
            f"the coordinator{where} refused worker id {worker_id!r}: another live worker "
            f"process uses it. Give each worker process its own id, or leave worker_id unset "
            f"(the default is unique per process)."
        )
        return cls(message, worker_id=worker_id, **_common_kwargs(info))


class UnauthenticatedError(RPCError):
    """The coordinator found no valid API key on the call.

    ``problem`` says which way: ``missing``, ``malformed``, ``unknown``, ``expired`` or
    ``revoked`` (the last two with ``key_id``). Retrying with the same key does not help.

    Attributes:
        problem: One word, as above (``None`` when the server did not say).
        key_id: The key's id, for an expired or revoked key.
    """

    _hint = (
        "Pass a valid API key (api_key=, ConnectionOptions(api_key=...), the CLI's "
        "--api-key or CONVEYOR_API_KEY); an admin creates one with `conveyor keys create`. "
        "Run in (or under) the folder of a running `conveyor dev`, the client, the worker "
        "and the CLI find its key (.conveyor/dev/admin.key) by themselves."
    )

    def __init__(
        self,
        message: str,
        *,
        problem: str | None = None,
        key_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.problem = problem
        self.key_id = key_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        return cls(
            cls._describe(info),
            problem=info.metadata.get("problem") or None,
            key_id=info.metadata.get("key_id") or None,
            **_common_kwargs(info),
        )


class PermissionDeniedError(RPCError):
    """The API key is valid but lacks the scope the call needs.

    Attributes:
        scope: The scope the call needs (``submit``, ``read``, ``operate``, ``worker``,
            ``admin``).
        key_id: The key that lacks it.
    """

    _hint = "Use a key with that scope; an admin creates one with `conveyor keys create --scope`."

    def __init__(
        self, message: str, *, scope: str | None = None, key_id: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.scope = scope
        self.key_id = key_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        return cls(
            cls._describe(info),
            scope=info.metadata.get("scope") or None,
            key_id=info.metadata.get("key_id") or None,
            **_common_kwargs(info),
        )


class ApiKeyNotFoundError(RPCError):
    """No API key has the given id.

    Attributes:
        key_id: The id that was looked up.
    """

    _hint = "List the keys (`conveyor keys list`) to see their ids."

    def __init__(self, message: str, *, key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.key_id = key_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        key_id = info.metadata.get("key_id") or None
        return cls(cls._describe(info), key_id=key_id, **_common_kwargs(info))


class RateLimitNotFoundError(RPCError):
    """No rate limit has the given queue and type (``delete_rate_limit``).

    Attributes:
        queue: The queue named ("" for every queue).
        type: The task type named ("" for every type).
    """

    _hint = "List the rate limits (`conveyor limits list`) to see them."

    def __init__(
        self, message: str, *, queue: str | None = None, type: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.queue = queue
        self.type = type

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        return cls(
            cls._describe(info),
            queue=info.metadata.get("queue"),
            type=info.metadata.get("type"),
            **_common_kwargs(info),
        )


class LeaseNotHeldError(RPCError):
    """The attempt does not hold its task's lease any more: it cannot record an effect.

    The task finished, was cancelled or was leased again (this attempt's lease expired);
    a later attempt does the work. Stop the handler without the effect.

    Attributes:
        task_id: The task, when the server named it.
    """

    def __init__(self, message: str, *, task_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.task_id = task_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        task_id = info.metadata.get("task_id") or None
        return cls(cls._describe(info), task_id=task_id, **_common_kwargs(info))


class LockNotHeldError(RPCError):
    """The lock is not held by this holder any more (its TTL ran out, another took it).

    Attributes:
        name: The lock's name, when the server named it.
    """

    _hint = "Write nothing more under it; acquire it again (with a new fencing token)."

    def __init__(self, message: str, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.name = name

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        name = info.metadata.get("name") or None
        return cls(cls._describe(info), name=name, **_common_kwargs(info))


class WorkerNotFoundError(RPCError):
    """No worker with the given id is connected to the leader (DrainWorker).

    Attributes:
        worker_id: The id that was looked up.
    """

    _hint = "`conveyor status` lists the connected workers and their ids."

    def __init__(self, message: str, *, worker_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.worker_id = worker_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        worker_id = info.metadata.get("worker_id") or None
        return cls(cls._describe(info), worker_id=worker_id, **_common_kwargs(info))


class WebhookNotFoundError(RPCError):
    """No webhook subscription of the key's tenant has the given id.

    Attributes:
        webhook_id: The id that was looked up.
    """

    _hint = "List the subscriptions (`conveyor webhooks list`) to see their ids."

    def __init__(self, message: str, *, webhook_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.webhook_id = webhook_id

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        webhook_id = info.metadata.get("webhook_id") or None
        return cls(cls._describe(info), webhook_id=webhook_id, **_common_kwargs(info))


class WatchTooSlowError(RPCError):
    """A WatchTasks stream fell too far behind its task changes and the coordinator ended
    it (it buffers a bounded number per stream). Reopen it; read the current state with
    ``ListTasks``."""


class TaskTypeNotFoundError(RPCError):
    """The key's tenant has no definition of the task type.

    Attributes:
        type: The task type looked up.
    """

    _hint = "List the definitions (`conveyor types list`)."

    def __init__(self, message: str, *, type: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.type = type

    @classmethod
    def _from_status(cls, info: StatusInfo) -> RPCError:
        return cls(
            cls._describe(info), type=info.metadata.get("type") or None, **_common_kwargs(info)
        )


class DeadlineExceededError(RPCError):
    """The call did not complete before its deadline (the client's ``timeout``)."""

    _hint = (
        "Raise the client's timeout if the coordinator is just slow, or check its health; "
        "a change that timed out may still have been applied."
    )


def _reason(name: str) -> errors_pb2.ErrorReason.ValueType:
    return errors_pb2.ErrorReason.Value(_REASON_PREFIX + name)


#: The catalog: one class per ``conveyor.v1.ErrorReason`` value (UNSPECIFIED excepted).
ERROR_CLASSES: Mapping[errors_pb2.ErrorReason.ValueType, type[RPCError]] = {
    _reason("INVALID_ARGUMENT"): InvalidArgumentError,
    _reason("TASK_NOT_FOUND"): TaskNotFoundError,
    _reason("IDEMPOTENCY_KEY_CONFLICT"): IdempotencyConflictError,
    _reason("INVALID_STATE"): InvalidStateError,
    _reason("NOT_LEADER"): NotLeaderError,
    _reason("OVERLOADED"): OverloadedError,
    _reason("STORE_UNAVAILABLE"): StoreUnavailableError,
    _reason("PROTOCOL_VIOLATION"): ProtocolViolationError,
    _reason("SCHEDULE_NOT_FOUND"): ScheduleNotFoundError,
    _reason("SCHEDULE_ALREADY_EXISTS"): ScheduleAlreadyExistsError,
    _reason("ETAG_MISMATCH"): EtagMismatchError,
    _reason("OUTCOME_UNKNOWN"): OutcomeUnknownError,
    _reason("WORKER_ID_IN_USE"): WorkerIdInUseError,
    _reason("QUOTA_EXCEEDED"): QuotaExceededError,
    _reason("UNAUTHENTICATED"): UnauthenticatedError,
    _reason("PERMISSION_DENIED"): PermissionDeniedError,
    _reason("API_KEY_NOT_FOUND"): ApiKeyNotFoundError,
    _reason("RATE_LIMIT_NOT_FOUND"): RateLimitNotFoundError,
    _reason("LEASE_NOT_HELD"): LeaseNotHeldError,
    _reason("LOCK_NOT_HELD"): LockNotHeldError,
    _reason("WORKER_NOT_FOUND"): WorkerNotFoundError,
    _reason("WEBHOOK_NOT_FOUND"): WebhookNotFoundError,
    _reason("WATCH_TOO_SLOW"): WatchTooSlowError,
    _reason("TASK_TYPE_NOT_FOUND"): TaskTypeNotFoundError,
}

# Statuses without a reason of ours (gRPC's own, a proxy's, an older server) map by code.
# RESOURCE_EXHAUSTED has no entry on purpose: gRPC raises it locally for an oversized
# message, which is no sign of an overloaded coordinator.
_BY_CODE: Mapping[grpc.StatusCode, type[RPCError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}

_BY_NAME: Mapping[str, type[RPCError]] = {
    errors_pb2.ErrorReason.Name(number).removeprefix(_REASON_PREFIX): cls
    for number, cls in ERROR_CLASSES.items()
}


def error_from_rpc(err: grpc.RpcError, *, address: str | None = None) -> RPCError:
    """Converts a failed gRPC call (sync or aio) into the matching :class:`RPCError`."""
    info = parse_status(err, address=address)
    cls = (_BY_NAME.get(info.reason) if info.reason else None) or _BY_CODE.get(info.code)
    return (cls or RPCError)._from_status(info)


def parse_status(err: grpc.RpcError, *, address: str | None = None) -> StatusInfo:
    """Reads the code, message and ``google.rpc`` details off a failed call."""
    # Both grpc.Call (sync) and AioRpcError expose code()/details()/trailing_metadata();
    # grpc.RpcError itself declares none of them, hence getattr.
    code = cast(grpc.StatusCode, _call_attr(err, "code") or grpc.StatusCode.UNKNOWN)
    message = str(_call_attr(err, "details") or "")
    status = _rich_status(_call_attr(err, "trailing_metadata"))
    if status is None:
        return StatusInfo(code=code, message=message, address=address)

    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    violations: list[tuple[str, str]] = []
    quota: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            # A reason from another domain (a proxy, a gateway) is not in our catalog.
            if info.domain in ("", ERROR_DOMAIN):
                reason, domain, metadata = info.reason or None, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta() / timedelta(seconds=1)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota.extend((v.subject, v.description) for v in failure.violations)
    return StatusInfo(
        code=code,
        message=message or status.message,
        address=address,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_after=retry_after,
        field_violations=violations,
        quota_violations=quota,
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
