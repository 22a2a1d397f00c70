"""The CLI's wording: attempt counts, unserved tasks, times with zones, errors in CLI terms."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import grpc
import pytest

from conveyor.cli import output
from conveyor.cli.errors import RPCFailure, describe, describe_failure
from conveyor.cli.task_commands import unserved_text
from conveyor.client import Task, TaskState, WaitTimeoutError
from conveyor.transport._tls_hints import MUTUAL_TLS, PLAINTEXT, SERVER_TLS


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "uncounted", "text"),
    [
        (0, 3, 0, "0 of 3"),
        (2, 3, 0, "2 of 3"),
        (6, 3, 3, "3 of 3 (6 in all)"),  # redriven once after 3 attempts
        (2, 3, 1, "1 of 3 (2 in all)"),  # one interrupted by a worker's shutdown
    ],
)
def test_attempts_read_right(attempt: int, max_attempts: int, uncounted: int, text: str) -> None:
    assert output.attempts_text(attempt, max_attempts, uncounted) == text


def test_times_carry_their_zone() -> None:
    tick = datetime(2030, 1, 15, 1, 0, tzinfo=UTC)
    assert output.when(tick, ZoneInfo("Europe/Berlin")) == "2030-01-15 02:00:00 CET"
    assert output.when(tick, UTC) == "2030-01-15 01:00:00 UTC"
    assert output.when(None) == "-"


def test_unserved_says_which_worker_to_start() -> None:
    demo = Task(id="t", state=TaskState.PENDING, queue="default", type="echo")
    assert unserved_text(demo) == (
        "no connected worker serves type 'echo' on queue 'default': the task waits until one "
        "connects (start one: conveyor worker --demo)"
    )
    mine = Task(id="t", state=TaskState.PENDING, queue="mail", type="send-email")
    assert "conveyor worker MODULE:ATTR --queues mail" in unserved_text(mine)


@pytest.mark.parametrize(
    ("failure", "line"),
    [
        (
            RPCFailure(
                grpc.StatusCode.NOT_FOUND, "schedule 'x' does not exist", "a:1",
                "SCHEDULE_NOT_FOUND", {"name": "x"},
            ),
            "no schedule named x (it does not exist or was deleted; conveyor schedules list "
            "shows the schedules)",
        ),
        (
            RPCFailure(
                grpc.StatusCode.FAILED_PRECONDITION, "it is TASK_STATE_DEAD", "a:1",
                "INVALID_STATE", {"task_id": "t1", "state": "TASK_STATE_DEAD"},
            ),
            "task t1 is dead: conveyor cancel takes only unfinished tasks, conveyor retry only "
            "dead or cancelled ones",
        ),
        (
            RPCFailure(
                grpc.StatusCode.INVALID_ARGUMENT, "bad", "a:1", "INVALID_ARGUMENT",
                violations=(("type", "must not be empty"), ("queue", "too long")),
            ),
            "invalid request: type: must not be empty; queue: too long",
        ),
        (
            RPCFailure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "a:1"),
            "cannot reach the coordinator at a:1: is it running? (conveyor dev starts one; "
            "--coordinator names another)",
        ),
        (
            RPCFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "backlog limit 1000 reached", "a:1",
                "QUOTA_EXCEEDED", retry_after=2.0,
            ),
            "a:1 refused the call: backlog limit 1000 reached; try again in 2s",
        ),
        (
            RPCFailure(
                grpc.StatusCode.UNAUTHENTICATED, "no API key", "a:1", "UNAUTHENTICATED",
                {"problem": "missing"},
            ),
            "a:1 refused the call: no API key; pass one with --api-key or CONVEYOR_API_KEY "
            "(an admin creates one with `conveyor keys create`), or run the command in (or "
            "under) the folder of a running `conveyor dev`: it finds that dev's key "
            "(.conveyor/dev/admin.key) by itself",
        ),
        (
            RPCFailure(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials", "a:1"),
            "a:1 refused the call: invalid credentials (the CLI sends --api-key, or "
            "CONVEYOR_API_KEY)",
        ),
    ],
)  # fmt: skip
def test_failures_in_cli_terms(failure: RPCFailure, line: str) -> None:
    assert describe_failure(failure) == line


# What gRPC's client reports when TLS does not match (seen with grpcio 1.6x-1.8x).
_CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:a:1: Socket closed"
_HANDSHAKE = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:a:1: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
    "{}: Invalid certificate verification context: OK"
)


@pytest.mark.parametrize(
    ("message", "tls", "expected"),
    [
        (_CLOSED, PLAINTEXT, "it probably serves TLS; pass --tls-ca"),
        (_CLOSED, SERVER_TLS, "it probably requires a client certificate (mutual TLS)"),
        (_CLOSED, MUTUAL_TLS, "it probably refuses this client certificate"),
        (_HANDSHAKE.format("WRONG_VERSION_NUMBER"), SERVER_TLS, "probably serves plaintext"),
        (_HANDSHAKE.format("CERTIFICATE_VERIFY_FAILED"), SERVER_TLS, "check that --tls-ca"),
    ],
)
def test_tls_mismatches_name_the_likely_cause(message: str, tls: str, expected: str) -> None:
    # Issue 20, break 3: each read "cannot reach the coordinator at ...: is it running?".
    line = describe_failure(RPCFailure(grpc.StatusCode.UNAVAILABLE, message, "a:1"), tls)
    assert expected in line and "is it running" not in line, line


def test_client_errors_in_cli_terms() -> None:
    last = Task(id="t1", state=TaskState.PENDING, queue="default", type="echo")
    described = describe(WaitTimeoutError("t1", 5.0, last))
    assert described is not None
    message, code = described
    assert code == 1 and "cancel(" not in message and "conveyor cancel t1" in message
    assert message.startswith("gave up waiting after 5s: task t1 is pending")
    assert describe(ZeroDivisionError()) is None  # a bug keeps its traceback


def test_a_capped_count_reads_as_at_least() -> None:
    assert output.tally(1234, False) == 1234  # a table prints it as it always did
    assert output.tally(10_000, True) == "10000+"
