"""PendingResults.take_batch: the results of one Results message, by count and by bytes;
successes kept as their parts make the message a TaskResult would have."""

from __future__ import annotations

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker._results import MAX_RESULT_BYTES, PendingResults


def _result(n: int, size: int = 0) -> pb.TaskResult:
    return pb.TaskResult(
        lease=pb.Lease(task_id=f"t{n}", attempt=1, epoch=1),
        outcome=pb.TASK_OUTCOME_SUCCEEDED,
        result=b"x" * size,
    )


def _ids(batch: pb.Results) -> list[str]:
    return [r.lease.task_id for r in batch.results]


def _take(pending: PendingResults, limit: int, max_bytes: int, overhead: int) -> pb.Results:
    batch = pb.Results()
    taken = pending.take_batch(batch.results, limit, max_bytes, overhead)
    assert taken == len(batch.results)
    return batch


def test_batches_by_count_in_order_and_kept_until_acked() -> None:
    pending = PendingResults()
    for n in range(5):
        pending.add(_result(n))
    assert _ids(_take(pending, 2, 1 << 20, 10)) == ["t0", "t1"]
    assert _ids(_take(pending, 2, 1 << 20, 10)) == ["t2", "t3"]
    assert pending.unsent_count() == 1 and len(pending) == 5
    pending.ack_all([pb.ResultAck(lease=pb.Lease(task_id="t0", attempt=1), accepted=True)])
    pending.resend_all()
    assert _ids(_take(pending, 10, 1 << 20, 10)) == ["t1", "t2", "t3", "t4"]
    assert _ids(_take(pending, 10, 1 << 20, 10)) == []


def test_batches_by_bytes_and_a_large_result_goes_alone() -> None:
    pending = PendingResults()
    pending.add(_result(0, 60))
    pending.add(_result(1, 30))
    pending.add(_result(2, 500))
    pending.add(_result(3))
    # 60 + 10 and 30 + 10 fit in 120; the next one would not.
    assert _ids(_take(pending, 10, 120, 10)) == ["t0", "t1"]
    # Heavier than the limit on its own: sent alone rather than never.
    assert _ids(_take(pending, 10, 120, 10)) == ["t2"]
    assert _ids(_take(pending, 10, 120, 10)) == ["t3"]


def test_a_success_kept_as_its_parts_is_the_result_it_stands_for() -> None:
    pending = PendingResults()
    pending.add_success(("t0", 1), 1, b"")
    pending.add(_result(1, 3))
    pending.add_success(("t2", 1), 1, b"xx")
    pending.add_success(("t3", 4), 9, b"y" * 60)
    batch = _take(pending, 10, 1 << 20, 10)
    assert list(batch.results) == [
        _result(0),
        _result(1, 3),
        _result(2, 2),
        pb.TaskResult(
            lease=pb.Lease(task_id="t3", attempt=4, epoch=9),
            outcome=pb.TASK_OUTCOME_SUCCEEDED,
            result=b"y" * 60,
        ),
    ]
    assert pending.leases() == {
        ("t0", 1): pb.Lease(task_id="t0", attempt=1, epoch=1),
        ("t1", 1): pb.Lease(task_id="t1", attempt=1, epoch=1),
        ("t2", 1): pb.Lease(task_id="t2", attempt=1, epoch=1),
        ("t3", 4): pb.Lease(task_id="t3", attempt=4, epoch=9),
    }
    # Weighed by their bytes as TaskResults are: 60 + 10 does not fit beside the others.
    pending.resend_all()
    assert _ids(_take(pending, 10, 50, 10)) == ["t0", "t1", "t2"]
    assert _ids(_take(pending, 10, 50, 10)) == ["t3"]
    pending.ack_all(
        [
            pb.ResultAck(lease=pb.Lease(task_id="t0", attempt=1, epoch=1), accepted=True),
            pb.ResultAck(lease=pb.Lease(task_id="t3", attempt=4, epoch=9), accepted=False),
        ]
    )
    assert ("t0", 1) not in pending and ("t3", 4) not in pending and len(pending) == 2


def test_a_success_too_large_to_send_fails_for_good() -> None:
    pending = PendingResults()
    pending.add_success(("t0", 1), 1, b"z" * (MAX_RESULT_BYTES + 1))
    (sent,) = _take(pending, 10, 1 << 30, 10).results
    assert sent.lease == pb.Lease(task_id="t0", attempt=1, epoch=1)
    assert sent.outcome == pb.TASK_OUTCOME_FAILED and not sent.retryable
    assert "too large" in sent.error and not sent.result
