"""Worker results and heartbeats mapped from the wire (coordinator/lifecycle/results.py and
leases.py): one bad entry never fails the others; text is made storable."""

from __future__ import annotations

from conveyor.coordinator.lifecycle import leases
from conveyor.coordinator.lifecycle.leases import map_leases
from conveyor.coordinator.lifecycle.results import map_results
from conveyor.coordinator.store import tasks as store
from conveyor.transport._error_text import MAX_ERROR_BYTES, storable_error
from conveyor.v1 import worker_service_pb2 as pb

TASK = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
LEASE = pb.Lease(task_id=TASK, attempt=1, epoch=1)


def _result(**fields: object) -> pb.TaskResult:
    values: dict[str, object] = {"lease": LEASE, "outcome": pb.TASK_OUTCOME_SUCCEEDED, **fields}
    return pb.TaskResult(**values)  # type: ignore[arg-type]


def test_each_result_is_checked_alone() -> None:
    wire = [
        _result(result=b'"ok"'),
        _result(lease=pb.Lease(task_id="nonsense")),
        _result(outcome=99),
        _result(outcome=pb.TASK_OUTCOME_FAILED, error="boom\x00tail", retryable=True),
        _result(outcome=pb.TASK_OUTCOME_INTERRUPTED),
        _result(outcome=pb.TASK_OUTCOME_CANCELLED, retryable=True),
    ]
    mapped, outcomes = map_results("t", "w", wire, max_result_bytes=1024)
    assert mapped.stored == [0, 3, 4, 5]
    assert mapped.refused == {
        1: leases.REFUSED_MALFORMED,
        2: f"{leases.REFUSED_UNKNOWN_OUTCOME} 99",
    }
    ok, failed, interrupted, cancelled = outcomes
    assert ok.key == leases.LeaseKey("t", TASK, 1, 1, "w")
    assert (ok.outcome, ok.result) == (store.OUTCOME_SUCCEEDED, b'"ok"')
    assert (failed.outcome, failed.result, failed.error) == (
        store.OUTCOME_FAILED,
        None,
        "boom\\x00tail",
    )
    assert interrupted.outcome == store.OUTCOME_INTERRUPTED
    assert not cancelled.retryable  # a cancelled attempt is not retried
    answers = mapped.answers([True, False, True, True])
    assert answers[1] == (False, leases.REFUSED_MALFORMED)
    assert answers[3] == (False, leases.REFUSED_NOT_CURRENT)
    assert [a[0] for a in answers] == [True, False, False, False, True, True]


def test_a_result_too_large_to_store_fails_the_task_once_and_says_why() -> None:
    _, (outcome,) = map_results("t", "w", [_result(result=b"x" * 2000)], max_result_bytes=1000)
    assert (outcome.outcome, outcome.result, outcome.retryable) == (
        store.OUTCOME_FAILED,
        None,
        False,
    )
    assert "2000 bytes" in outcome.error and "1000" in outcome.error


def test_error_texts_are_cut_to_size() -> None:
    text = storable_error("head " + "e" * (MAX_ERROR_BYTES * 2) + " tail")
    assert len(text.encode()) <= MAX_ERROR_BYTES and "[... truncated ...]" in text
    assert text.startswith("head ") and text.endswith(" tail")
    assert storable_error("fine") == "fine"
    # The same cut as the worker SDK's, in bytes: a text with NUL bytes and wide
    # characters from a worker in another language is stored in the same shape.
    wide = storable_error("\x00€" * MAX_ERROR_BYTES)
    assert "\x00" not in wide and len(wide.encode()) <= MAX_ERROR_BYTES


def test_heartbeat_leases_malformed_ones_are_lost() -> None:
    mapped, keys = map_leases("t", "w", [LEASE, pb.Lease(task_id="x")])
    assert keys == [leases.LeaseKey("t", TASK, 1, 1, "w")]
    assert mapped.answers([True]) == [(True, ""), (False, leases.REFUSED_MALFORMED)]


def test_a_payload_the_worker_cannot_open_is_an_attempt_that_never_started() -> None:
    """KEY_UNAVAILABLE: stored as NOT_STARTED (not counted), and the key is noted so the
    stream gives that worker no more of its tasks."""
    wire = [
        _result(outcome=pb.TASK_OUTCOME_KEY_UNAVAILABLE, key_id="k1", error="no k1"),
        _result(result=b'"ok"'),
    ]
    mapped, (unopened, ok) = map_results("t", "w", wire, max_result_bytes=1024)
    assert (unopened.outcome, unopened.result, unopened.error) == (
        store.OUTCOME_NOT_STARTED,
        None,
        "no k1",
    )
    assert ok.outcome == store.OUTCOME_SUCCEEDED
    assert mapped.missing_keys == {"k1"}
    assert map_results("t", "w", [_result()], max_result_bytes=1)[0].missing_keys is None
