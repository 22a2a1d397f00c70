"""The error catalog and the one mapping table (coordinator/errors.py)."""

from __future__ import annotations

import base64
import urllib.parse

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.coordinator import bounds, errors
from conveyor.coordinator.errors import (
    ConveyorError,
    Fenced,
    FieldViolation,
    InvalidArgument,
    NotLeader,
    OutcomeUnknown,
    QuotaExceeded,
    StoreUnavailable,
    domain_error,
    to_status,
)
from conveyor.coordinator.store.db import committing
from conveyor.v1 import errors_pb2


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def test_every_error_reason_has_exactly_one_server_error_class() -> None:
    by_reason: dict[int, list[str]] = {}
    for cls in _subclasses(ConveyorError):
        if "reason" in vars(cls):
            by_reason.setdefault(vars(cls)["reason"], []).append(cls.__name__)
    for name, value in errors_pb2.ErrorReason.items():
        if value == errors_pb2.ERROR_REASON_UNSPECIFIED:
            assert value not in by_reason, by_reason.get(value)
            continue
        assert len(by_reason.get(value, [])) == 1, (name, by_reason.get(value))
    assert set(by_reason) <= set(errors_pb2.ErrorReason.values())


def _details(status: grpc.Status) -> dict[str, object]:
    metadata = dict(status.trailing_metadata)
    rich = status_pb2.Status.FromString(metadata["grpc-status-details-bin"])
    out: dict[str, object] = {}
    for any_ in rich.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if any_.Is(cls.DESCRIPTOR):
                message = cls()
                any_.Unpack(message)
                out[cls.__name__] = message
    return out


def test_status_carries_error_info_bad_request_and_retry_info() -> None:
    status = to_status(InvalidArgument([FieldViolation("tasks[1].type", "must not be empty")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = _details(status)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "conveyor.dev")  # type: ignore[attr-defined]
    assert [v.field for v in details["BadRequest"].field_violations] == ["tasks[1].type"]  # type: ignore[attr-defined]
    assert "RetryInfo" not in details

    details = _details(to_status(NotLeader("10.0.0.1:50051")))
    assert details["ErrorInfo"].metadata["leader_address"] == "10.0.0.1:50051"  # type: ignore[attr-defined]
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 50  # type: ignore[attr-defined]


def test_quota_exceeded_names_the_limit_with_retry_info() -> None:
    status = to_status(QuotaExceeded("max_backlog", "about 10 unfinished tasks", 1.5))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(status)
    assert details["ErrorInfo"].reason == "QUOTA_EXCEEDED"  # type: ignore[attr-defined]
    (violation,) = details["QuotaFailure"].violations  # type: ignore[attr-defined]
    assert violation.subject == "max_backlog"
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1500  # type: ignore[attr-defined]


@pytest.mark.parametrize("seconds", [1e12, float("inf"), float("nan"), -1.0, 5e-324])
def test_every_retry_info_has_a_sane_ceiling(seconds: float) -> None:
    """A tiny submit rate made an infinite wait, and RetryInfo raised OverflowError: the
    caller saw UNKNOWN (issue 15). Every RetryInfo is within 0 and bounds.RETRY_AFTER_MAX."""
    details = _details(to_status(QuotaExceeded("submit_rate", "slow", seconds)))
    delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    assert 0 <= delay <= bounds.RETRY_AFTER_MAX


def test_a_status_fits_the_trailers_a_client_takes_whatever_the_request() -> None:
    """A 10 KB field echoed in a violation, or a thousand bad tasks, made trailers the
    client refused (RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT sent)."""
    huge = "é" * 10_000
    violations = [FieldViolation(f"tasks[{i}].{huge}", f"{huge!r} is wrong") for i in range(1000)]
    status = to_status(InvalidArgument(violations))
    # On the wire: binary trailers in base64, the message percent-encoded.
    wire = len(urllib.parse.quote(status.details.encode()))
    for key, value in status.trailing_metadata:
        raw = value if isinstance(value, bytes) else str(value).encode()
        wire += len(key) + len(base64.b64encode(raw))
    assert wire < 8 * 1024
    bad = _details(status)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert len(bad) == errors.MAX_VIOLATIONS + 1 and "990 more" in bad[-1].description


def test_outcome_unknown_is_not_retry_shortly() -> None:
    status = to_status(OutcomeUnknown("connection reset"))
    details = _details(status)
    assert details["ErrorInfo"].reason == "OUTCOME_UNKNOWN"  # type: ignore[attr-defined]
    assert "RetryInfo" not in details
    assert "retry shortly" not in status.details
    assert "idempotency key" in status.details


# Store failures, built the way asyncpg raises them.
RETRYABLE = [
    asyncpg.exceptions.AdminShutdownError,  # 57P01: PostgreSQL restarting
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.QueryCanceledError,  # 57014: statement timeout
    asyncpg.exceptions.ConnectionDoesNotExistError,  # 08003
]


@pytest.mark.parametrize("exc_class", RETRYABLE, ids=lambda c: c.sqlstate)
def test_store_outages_are_unavailable_with_retry_info(exc_class: type[Exception]) -> None:
    error = domain_error(exc_class("boom"))
    assert isinstance(error, StoreUnavailable)
    status = to_status(error)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in _details(status)


@pytest.mark.parametrize(
    "exc", [OSError("reset"), TimeoutError(), asyncpg.InterfaceError("connection is closed")]
)
def test_lost_connections_are_unavailable(exc: Exception) -> None:
    assert isinstance(domain_error(exc), StoreUnavailable)


def test_values_postgresql_refuses_are_invalid_argument() -> None:
    error = domain_error(asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte 0x00"))
    assert isinstance(error, InvalidArgument)
    assert to_status(error).code == grpc.StatusCode.INVALID_ARGUMENT


def test_fenced_is_not_leader_and_bugs_are_unknown_to_the_table() -> None:
    assert isinstance(domain_error(Fenced(3)), NotLeader)
    assert domain_error(KeyError("bug")) is None


def test_rolled_back_only_when_the_server_said_so() -> None:
    assert errors.rolled_back(asyncpg.exceptions.UniqueViolationError("dup"))
    assert errors.rolled_back(asyncpg.exceptions.DeadlockDetectedError("x"))
    assert not errors.rolled_back(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
    assert not errors.rolled_back(asyncpg.exceptions.AdminShutdownError("bye"))
    assert not errors.rolled_back(OSError("reset"))
    assert not errors.rolled_back(RuntimeError("bug"))


def test_a_connection_lost_while_committing_is_outcome_unknown() -> None:
    with pytest.raises(OutcomeUnknown), committing():
        raise asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-commit")
    # A refusal is not unknown: the server rolled back.
    with pytest.raises(asyncpg.exceptions.UniqueViolationError), committing():
        raise asyncpg.exceptions.UniqueViolationError("dup")
