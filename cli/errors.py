"""How the CLI reports failure: one line in CLI terms (``conveyor: ...``), never a traceback.

:func:`describe` knows every failure a user can cause or meet (bad input, an unreachable
coordinator, a missing task, a busy port, a wait that timed out, ...) and words it as
commands and flags, not as Python calls. Anything it does not know is a bug and keeps its
traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from conveyor.transport import error_from_rpc
from conveyor.transport._tls_hints import tls_mismatch

# Exit codes: 1 for a failure, 2 for a usage error (as click and argparse use them).
FAILURE = 1
USAGE = 2


class CLIError(Exception):
    """An error to print as one line (``conveyor: <message>``) before exiting with ``code``."""

    def __init__(self, message: str, code: int = FAILURE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RPCFailure:
    """What the CLI needs of a failed call (read off the client's ``RPCError``)."""

    code: grpc.StatusCode
    message: str
    address: str | None = None
    reason: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    violations: tuple[tuple[str, str], ...] = ()


def _failure_from_client(err: object) -> RPCFailure:
    """The failure a ``conveyor.client.RPCError`` describes (its documented attributes)."""
    return RPCFailure(
        code=getattr(err, "code", grpc.StatusCode.UNKNOWN),
        message=getattr(err, "server_message", "") or str(err),
        address=getattr(err, "address", None),
        reason=getattr(err, "reason", None),
        metadata=getattr(err, "metadata", None) or {},
        retry_after=getattr(err, "retry_after", None),
        violations=tuple(getattr(err, "field_violations", ()) or ()),
    )


def _retry(retry_after: float | None) -> str:
    return f"try again in {retry_after:g}s" if retry_after else "try again shortly"


def _connection_failure(message: str) -> bool:
    text = message.lower()
    return not text or any(
        sign in text for sign in ("connect", "connection refused", "dns resolution", "unavailable")
    )


def _tls_failure(f: RPCFailure, tls: str) -> str | None:
    """A connection that TLS (or its absence) broke, naming the likely mismatch."""
    if f.code is not grpc.StatusCode.UNAVAILABLE:
        return None
    return tls_mismatch(f.message, f.address or "the coordinator", tls)


_PROTO_ENUM = re.compile(r"\b(?:TASK_STATE|ATTEMPT_OUTCOME|TASK_OUTCOME)_([A-Z_]+)\b")


def _cli_terms(text: str) -> str:
    """Proto enum names as the CLI writes them: TASK_STATE_DEAD -> dead."""
    words = _PROTO_ENUM.sub(lambda m: m[1].lower().replace("_", " "), text)
    return words.lower() if words.isupper() else words


def describe_failure(f: RPCFailure, tls: str = "") -> str:
    """One line for a failed call, in CLI terms (``tls``: how the command dialled, one of
    ``transport._tls_hints``' PLAINTEXT, SERVER_TLS, MUTUAL_TLS, so a refused connection
    names the likely mismatch)."""
    return _cli_terms(" ".join((_tls_failure(f, tls) or _describe_failure(f)).split()))


def _describe_failure(f: RPCFailure) -> str:
    where = f.address or "the coordinator"
    meta = f.metadata
    reason = f.reason
    if f.violations:
        listed = "; ".join(f"{name}: {what}" for name, what in f.violations)
        return f"invalid request: {listed}"
    if reason == "TASK_NOT_FOUND":
        return f"no task with id {meta.get('task_id', '?')} (conveyor tasks lists recent ones)"
    if reason == "SCHEDULE_NOT_FOUND":
        return (
            f"no schedule named {meta.get('name', '?')} (it does not exist or was deleted; "
            "conveyor schedules list shows the schedules)"
        )
    if reason == "SCHEDULE_ALREADY_EXISTS":
        name = meta.get("name", "?")
        return f"a schedule named {name} exists already (conveyor schedules get {name})"
    if reason == "IDEMPOTENCY_KEY_CONFLICT":
        task = meta.get("task_id", "?")
        return (
            f"idempotency key {meta.get('idempotency_key', '?')} is already used by task "
            f"{task}, submitted with a different request: use a new key "
            f"(conveyor get {task} shows that task)"
        )
    if reason == "INVALID_STATE":
        task, state = meta.get("task_id", "?"), _cli_terms(meta.get("state", "?"))
        return (
            f"task {task} is {state}: conveyor cancel takes only unfinished tasks, "
            "conveyor retry only dead or cancelled ones"
        )
    if reason == "STORE_UNAVAILABLE":
        return f"{where} cannot reach its PostgreSQL: {f.message}; {_retry(f.retry_after)}"
    if reason == "NOT_LEADER":
        leader = meta.get("leader_address")
        known = f"says the leader is {leader}" if leader else "knows no leader yet"
        return f"{where} is not the leader and {known}; {_retry(f.retry_after)}"
    if reason in ("OVERLOADED", "QUOTA_EXCEEDED"):
        return f"{where} refused the call: {f.message}; {_retry(f.retry_after)}"
    if reason == "OUTCOME_UNKNOWN":
        return (
            f"{where} lost its database connection while writing, so the change may or may "
            "not have been made: look before trying again (conveyor get, conveyor tasks); a "
            "submit with --idempotency-key is safe to repeat"
        )
    if f.code is grpc.StatusCode.UNAVAILABLE:
        # gRPC's own words for a refused connection add nothing; a server's words might.
        said = "" if _connection_failure(f.message) else f" ({f.message})"
        return (
            f"cannot reach the coordinator at {where}{said}: is it running? (conveyor dev "
            "starts one; --coordinator names another)"
        )
    if f.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer in time; raise --rpc-timeout if it is just slow"
    if f.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return _refused(f, where)
    if f.code is grpc.StatusCode.UNIMPLEMENTED:
        return f"{where} does not offer this call ({f.message}); is it an older version?"
    return f"{where} answered {f.code.name}: {f.message or 'no details'}"


def _refused(f: RPCFailure, where: str) -> str:
    """An API key the coordinator did not take, and how to get one that works."""
    hint = ""
    if f.metadata.get("problem") == "missing":
        hint = (
            "; pass one with --api-key or CONVEYOR_API_KEY (an admin creates one with "
            "`conveyor keys create`), or run the command in (or under) the folder of a "
            "running `conveyor dev`: it finds that dev's key (.conveyor/dev/admin.key) by "
            "itself"
        )
    elif f.metadata.get("problem") in ("malformed", "unknown"):
        hint = (
            "; pass one with --api-key or CONVEYOR_API_KEY (an admin creates one with "
            "`conveyor keys create`)"
        )
    elif f.code is grpc.StatusCode.UNAUTHENTICATED:
        hint = " (the CLI sends --api-key, or CONVEYOR_API_KEY)"
    return f"{where} refused the call: {f.message or f.code.name.lower()}{hint}"


def describe(exc: BaseException, tls: str = "") -> tuple[str, int] | None:
    """(one line, exit code) for an expected failure, or None for a bug (``tls``: as
    :func:`describe_failure` takes it)."""
    from conveyor.client import ConveyorError, RPCError, WaitTimeoutError

    if isinstance(exc, CLIError):
        return str(exc), exc.code
    if isinstance(exc, grpc.RpcError):  # a raw call's: read by the client's catalog
        exc = error_from_rpc(exc)
    if isinstance(exc, RPCError):
        return describe_failure(_failure_from_client(exc), tls), FAILURE
    if isinstance(exc, WaitTimeoutError):
        state = exc.task.state.value.lower() if exc.task is not None else "not seen yet"
        return (
            f"gave up waiting after {exc.timeout:g}s: task {exc.task_id} is {state}; it "
            f"keeps going (conveyor get {exc.task_id} shows it, conveyor cancel "
            f"{exc.task_id} stops it)",
            FAILURE,
        )
    if isinstance(exc, ConveyorError):
        return str(exc), FAILURE
    from conveyor.embedded.postgres import EmbeddedPostgresError

    if isinstance(exc, EmbeddedPostgresError):
        # Its message ends with the server log; the first line says what failed.
        return str(exc).splitlines()[0], FAILURE
    from conveyor.worker import NonRetryableError, WorkerLoadError

    if isinstance(exc, WorkerLoadError):
        return str(exc), USAGE
    if type(exc).__module__.startswith("conveyor.worker.") and not isinstance(
        exc, NonRetryableError
    ):
        # The worker SDK's own errors (a worker with no handlers, a worker id in use, ...)
        # are documented failures whose messages say what to do.
        return str(exc), FAILURE
    if isinstance(exc, OSError):
        return str(exc), FAILURE
    return None
