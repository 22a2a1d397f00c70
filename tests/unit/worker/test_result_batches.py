"""PendingResults.take_batch: the results of one Results message, by count and by bytes."""

from __future__ import annotations

from conveyor.v1 import worker_service_pb2 as pb
from conveyor.worker._results import PendingResults


def _result(n: int, size: int = 0) -> pb.TaskResult:
    return pb.TaskResult(
        lease=pb.Lease(task_id=f"t{n}", attempt=1, epoch=1),
        outcome=pb.TASK_OUTCOME_SUCCEEDED,
        result=b"x" * size,
    )


def _ids(batch: list[pb.TaskResult]) -> list[str]:
    return [r.lease.task_id for r in batch]


def test_batches_by_count_in_order_and_kept_until_acked() -> None:
    pending = PendingResults()
    for n in range(5):
        pending.add(_result(n))
    assert _ids(pending.take_batch(2, 1 << 20, 10)) == ["t0", "t1"]
    assert _ids(pending.take_batch(2, 1 << 20, 10)) == ["t2", "t3"]
    assert pending.unsent_count() == 1 and len(pending) == 5
    pending.ack(pb.ResultAck(lease=pb.Lease(task_id="t0", attempt=1), accepted=True))
    pending.resend_all()
    assert _ids(pending.take_batch(10, 1 << 20, 10)) == ["t1", "t2", "t3", "t4"]
    assert pending.take_batch(10, 1 << 20, 10) == []


def test_batches_by_bytes_and_a_large_result_goes_alone() -> None:
    pending = PendingResults()
    pending.add(_result(0, 60))
    pending.add(_result(1, 30))
    pending.add(_result(2, 500))
    pending.add(_result(3))
    # 60 + 10 and 30 + 10 fit in 120; the next one would not.
    assert _ids(pending.take_batch(10, 120, 10)) == ["t0", "t1"]
    # Heavier than the limit on its own: sent alone rather than never.
    assert _ids(pending.take_batch(10, 120, 10)) == ["t2"]
    assert _ids(pending.take_batch(10, 120, 10)) == ["t3"]
