"""The audit log against a coordinator process: key, schedule, cancel, retry, pause and admin
calls are each a row (with the key id, never the secret, the outcome, the peer and the
request id); ``conveyor audit verify`` passes on the whole chain, and names the row that was
edited or deleted (through the API and with --dsn)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import grpc
import pytest
from clitools import conveyor
from security import Keys, call, running, secure_coordinator

from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import schedule_pb2, task_service_pb2

pytestmark = pytest.mark.slow

TASKS = "/conveyor.v1.TaskService/"


async def test_actions_are_audited_and_tampering_is_detected(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        keys = Keys(channel, admin_key)
        acme = await keys.create("acme", "submit", "read", "operate")
        other = await keys.create("globex", "submit", "operate")
        doomed = await keys.create("acme", "read")
        await keys.revoke(doomed.id)
        submitted = await call(
            channel, TASKS + "SubmitTask", task_service_pb2.SubmitTaskRequest(type="t"),
            acme.metadata,
        )  # fmt: skip
        task_id = submitted.response.task.id
        traced = (*acme.metadata, ("x-request-id", "req-cancel-1"))
        assert (await call(
            channel, TASKS + "CancelTask", task_service_pb2.CancelTaskRequest(id=task_id), traced
        )).code == grpc.StatusCode.OK  # fmt: skip
        # Another tenant's cancel of the same task: NOT_FOUND, and audited as such.
        assert (await call(
            channel, TASKS + "CancelTask", task_service_pb2.CancelTaskRequest(id=task_id),
            other.metadata,
        )).code == grpc.StatusCode.NOT_FOUND  # fmt: skip
        # A cancelled task is redriven; once pending again, a second retry is refused.
        for expected_code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION):
            assert (await call(
                channel, TASKS + "RetryTask", task_service_pb2.RetryTaskRequest(id=task_id),
                acme.metadata,
            )).code == expected_code  # fmt: skip
        schedule = schedule_pb2.Schedule(
            name="nightly", cron="0 3 * * *", task_template=schedule_pb2.TaskTemplate(type="t")
        )
        for method, request in (
            ("CreateSchedule", schedule_pb2.CreateScheduleRequest(schedule=schedule)),
            ("PauseSchedule", schedule_pb2.PauseScheduleRequest(name="nightly")),
            ("ResumeSchedule", schedule_pb2.ResumeScheduleRequest(name="nightly")),
            ("DeleteSchedule", schedule_pb2.DeleteScheduleRequest(name="nightly")),
        ):
            assert (await call(channel, TASKS + method, request, acme.metadata)).code == (
                grpc.StatusCode.OK
            ), method
        queues = task_service_pb2.ListQueuesRequest()
        await call(channel, TASKS + "ListQueues", queues, doomed.metadata)  # revoked
        await call(channel, TASKS + "ListQueues", queues, other.metadata)  # no read scope

        admin = ["--coordinator", coordinator.address, "--api-key", admin_key]
        listed = await conveyor("audit", "list", "-n", "100", "--json", *admin)
        assert listed.code == 0, listed.err
        events = json.loads(listed.out)["events"]
        seen = {(e["action"], e.get("target", ""), e["outcome"]) for e in events}
        expected = {
            ("api_key.bootstrap", f"default/{api_keys.parse(admin_key)}", "OK"),
            ("CreateApiKey", f"acme/{acme.id}", "OK"),
            ("RevokeApiKey", f"acme/{doomed.id}", "OK"),
            ("CancelTask", task_id, "OK"),
            ("CancelTask", task_id, "TASK_NOT_FOUND"),
            ("RetryTask", task_id, "OK"),
            ("RetryTask", task_id, "INVALID_STATE"),
            ("CreateSchedule", "nightly", "OK"),
            ("PauseSchedule", "nightly", "OK"),
            ("ResumeSchedule", "nightly", "OK"),
            ("DeleteSchedule", "nightly", "OK"),
        }
        assert expected <= seen, expected - seen
        cancel = next(e for e in events if e.get("request_id") == "req-cancel-1")
        assert (cancel["tenant"], cancel["key_id"]) == ("acme", acme.id)
        assert cancel["peer"] == "127.0.0.1"  # the address, as in failure rows: no port
        refused_cancel = next(e for e in events if e["outcome"] == "TASK_NOT_FOUND")
        assert (refused_cancel["tenant"], refused_cancel["key_id"]) == ("globex", other.id)
        # Submits and reads are not audited (the hot path).
        assert not {e["action"] for e in events} & {"SubmitTask", "ListQueues"}

        verified = await conveyor("audit", "verify", *admin)
        assert verified.code == 0 and "audit log intact" in verified.out, verified.out

    db = await asyncpg.connect(database_dsn)
    try:
        # Aggregated failures were written when the coordinator stopped.
        actions = {r["action"] for r in await db.fetch("SELECT action FROM audit_events")}
        assert {"authentication_failed", "permission_denied", "ListAuditEvents"} <= actions
        # Never a secret, anywhere in the log.
        text = " ".join(str(dict(r)) for r in await db.fetch("SELECT * FROM audit_events"))
        for key in (admin_key, acme.key, other.key, doomed.key):
            assert key.split("_", 2)[2] not in text
        head = await db.fetchval("SELECT max(seq) FROM audit_events")
        verified = await conveyor("audit", "verify", "--dsn", database_dsn)
        assert verified.code == 0 and f"{head} rows" in verified.out, verified.out

        # An edited row.
        await db.execute("UPDATE audit_events SET target = target || '-forged' WHERE seq = 5")
        verified = await conveyor("audit", "verify", "--dsn", database_dsn)
        assert verified.code == 1
        assert "row 5: row 5 was edited" in verified.out and "TAMPERED" in verified.out
        # Edited with its hash recomputed by someone who knows the encoding: caught at 6.
        from conveyor.coordinator.audit.chain import row_hash
        from conveyor.coordinator.store.audit import row_from_record

        row = row_from_record(await db.fetchrow("SELECT * FROM audit_events WHERE seq = 5"))
        await db.execute(
            "UPDATE audit_events SET hash = $1 WHERE seq = 5",
            row_hash(row.prev_hash, 5, row.event),
        )
        verified = await conveyor("audit", "verify", "--dsn", database_dsn)
        assert verified.code == 1 and "row 6 does not follow row 5" in verified.out
        # A deleted row.
        await db.execute("DELETE FROM audit_events WHERE seq = 8")
        verified = await conveyor("audit", "verify", "--dsn", database_dsn)
        assert verified.code == 1 and "row 8 is missing (deleted)" in verified.out
    finally:
        await db.close()
