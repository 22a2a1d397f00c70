"""The one lease key (coordinator/lifecycle/leases.py)."""

from __future__ import annotations

from conveyor.coordinator import convert
from conveyor.coordinator.lifecycle import leases
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.coordinator.store import tasks as store
from conveyor.v1 import worker_service_pb2

TASK = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def test_a_wire_lease_becomes_the_key_of_the_session_that_sends_it() -> None:
    wire = worker_service_pb2.Lease(task_id=TASK.upper(), attempt=2, epoch=7)
    key = leases.parse("t1", "w1", wire)
    assert key == LeaseKey("t1", TASK, 2, 7, "w1")
    assert key is not None and convert.to_proto(key) == worker_service_pb2.Lease(
        task_id=TASK, attempt=2, epoch=7
    )


def test_malformed_task_ids_are_no_key() -> None:
    for bad in ("", "garbage", TASK + "\n", TASK[:-1], "{" + TASK + "}", TASK.replace("-", "")):
        assert leases.parse("t", "w", worker_service_pb2.Lease(task_id=bad)) is None


def test_keys_differ_by_attempt_and_epoch() -> None:
    first = LeaseKey("t", TASK, 1, 1, "w")
    assert first != first._replace(attempt=2)
    assert first != first._replace(epoch=2)
    assert first != first._replace(worker_id="other")


def test_key_arrays_are_the_store_parameters_in_order() -> None:
    keys = [LeaseKey("t", TASK, 1, 3, "w"), LeaseKey("t", TASK, 2, 3, "w")]
    assert store.key_arrays(keys) == {
        "tenant": ["t", "t"],
        "id": [TASK, TASK],
        "attempt": [1, 2],
        "epoch": [3, 3],
        "worker_id": ["w", "w"],
    }
    assert store.key_arrays([])["id"] == []
