"""A worker of tenant A that reports a result or a heartbeat for a lease of tenant B: refused,
recorded, nothing changed. Worker ids are per tenant: B's worker id does not stop A's."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import grpc
import pytest
from security import Keys, running, secure_coordinator
from testsupport import RawWorker

from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc, worker_service_pb2

pytestmark = pytest.mark.slow

RUNNING, SUCCEEDED = 3, 4


async def test_a_worker_cannot_report_for_another_tenants_lease(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        keys = Keys(channel, admin_key)
        b_submit = await keys.create("tenant-b", "submit")
        b_worker_key = await keys.create("tenant-b", "worker")
        a_worker_key = await keys.create("tenant-a", "worker")
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        task = (
            await stub.SubmitTask(
                task_service_pb2.SubmitTaskRequest(queue="q", type="t", payload=b'"b"'),
                metadata=b_submit.metadata,
            )
        ).task
        b_worker, a_worker = RawWorker(coordinator.address), RawWorker(coordinator.address)
        try:
            await b_worker.connect(
                "same-id", queues=("q",), types=("t",), metadata=b_worker_key.metadata
            )
            (assignment,) = await b_worker.assignments(1)
            lease = assignment.lease
            assert lease.task_id == task.id
            # The same worker id in another tenant is another worker.
            await a_worker.connect(
                "same-id", queues=("q",), types=("t",), metadata=a_worker_key.metadata
            )
            ack = await a_worker.report(lease, result=b'"forged"')
            assert not ack.accepted and "not current" in ack.reason
            await a_worker.send(heartbeat=worker_service_pb2.Heartbeat(leases=[lease]))
            beat = await a_worker.receive_kind("heartbeat_ack")
            assert list(beat.lost) == [lease]

            db = await asyncpg.connect(database_dsn)
            try:
                row = await db.fetchrow(
                    "SELECT tenant, state, worker_id, attempt, result FROM tasks WHERE id = $1",
                    task.id,
                )
                assert dict(row) == {
                    "tenant": "tenant-b",
                    "state": RUNNING,
                    "worker_id": "same-id",
                    "attempt": 1,
                    "result": None,
                }
                refused = await db.fetch(
                    "SELECT tenant, worker_id, reason FROM refused_results WHERE task_id = $1",
                    task.id,
                )
                assert [(r["tenant"], r["worker_id"]) for r in refused] == [("tenant-a", "same-id")]
                # B's own worker still owns the lease and finishes it.
                ack = await b_worker.report(lease, result=b'"done"')
                assert ack.accepted
                row = await db.fetchrow("SELECT state, result FROM tasks WHERE id = $1", task.id)
                assert (row["state"], bytes(row["result"])) == (SUCCEEDED, b'"done"')
            finally:
                await db.close()
        finally:
            await a_worker.close()
            await b_worker.close()
