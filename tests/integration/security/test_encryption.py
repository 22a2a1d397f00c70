"""End-to-end payload encryption across real processes: a key file made and rotated with
``conveyor encryption``, tasks submitted under each key, one worker process with the
rotated ring running both, results read back, and PostgreSQL holding no plaintext."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from clitools import CLI, conveyor
from cluster import CoordinatorProcess
from processes import ManagedProcess
from testsupport import RawWorker, eventually

from conveyor.client import AsyncClient, AttemptOutcome, EncryptionCodec, KeyRing, TaskState
from conveyor.transport import ENCRYPTED_CONTENT_TYPE
from conveyor.transport._encryption import envelope_key_id
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, worker_service_pb2

# What must never reach the coordinator or PostgreSQL in clear text.
SECRET = "card 4111-1111-1111-1111 of ada@example.com"


class DemoWorker(ManagedProcess):
    """``conveyor worker --demo`` (echo returns its payload) with a key file."""

    def __init__(self, address: str, key_file: Path | None, log_dir: Path) -> None:
        super().__init__("demo-worker", log_dir)
        self.address = address
        self.key_file = key_file

    def command(self) -> list[str]:
        keys = ["--encryption-key-file", str(self.key_file)] if self.key_file else []
        return [*CLI, "worker", "--demo", "--coordinator", self.address, *keys]


@pytest.fixture
def coordinator(database_dsn: str, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(database_dsn, None, log_dir=tmp_path)
    try:
        yield process.start()
    finally:
        process.close()


async def plaintext_in_database(dsn: str, needle: str) -> list[str]:
    """Every row of every table that holds ``needle`` as text or as bytes (bytea shows
    as hex in a row's text form)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        found = []
        for table in tables:
            for row in await conn.fetch(f'SELECT t::text AS text FROM "{table}" t'):
                text = row["text"]
                if needle in text or needle.encode().hex() in text:
                    found.append(f"{table}: {text[:200]}")
        return found
    finally:
        await conn.close()


async def _stored(dsn: str, task_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT payload, content_type, result, state FROM tasks WHERE id = $1::uuid", task_id
        )
        assert row is not None
        return row
    finally:
        await conn.close()


@pytest.mark.slow
async def test_rotation_end_to_end(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    payload = json.dumps({"secret": SECRET})
    with_keys = ["--coordinator", address, "--encryption-key-file", str(keys)]

    made = await conveyor("encryption", "new-key", "--key-file", str(keys), "--key-id", "k1")
    assert made.code == 0, made.err
    # Task 1: submitted by the CLI under key 1.
    first = await conveyor(*with_keys, "submit", "echo", payload)
    assert first.code == 0, first.err
    first_id = first.out.strip()

    rotated = await conveyor("encryption", "rotate", "--key-file", str(keys), "--key-id", "k2")
    assert rotated.code == 0, rotated.err
    assert KeyRing.load(keys).primary == "k2"

    # Task 2: submitted by the client library under key 2.
    async with AsyncClient(address, codec=EncryptionCodec.from_key_file(keys)) as client:
        second = await client.submit("echo", {"secret": SECRET}, idempotency_key="order-2")
        # The same submit again is recognised as a resend, not refused as different.
        again = await client.submit("echo", {"secret": SECRET}, idempotency_key="order-2")
        assert again.id == second.id
        # Answers say the content type as submitted; a repeat echoes the payload in clear.
        assert second.content_type == again.content_type == "application/json"
        assert json.loads(again.payload) == {"secret": SECRET}
        many = await client.submit_many(
            [{"type": "other", "payload": {"n": n}} for n in range(1500)]
        )
        assert {t.content_type for t in many} == {"application/json"}

        stored = {t: await _stored(database_dsn, t) for t in (first_id, second.id)}
        assert envelope_key_id(stored[first_id]["payload"]) == "k1"
        assert envelope_key_id(stored[second.id]["payload"]) == "k2"
        assert {r["content_type"] for r in stored.values()} == {ENCRYPTED_CONTENT_TYPE}

        # One worker with the rotated ring runs both.
        worker = DemoWorker(address, keys, tmp_path)
        try:
            worker.start()
            for task_id in (first_id, second.id):
                done = await client.wait(task_id, timeout=60)
                assert done.state is TaskState.SUCCEEDED, (done, worker.log_tail())
                assert json.loads(done.result) == {"secret": SECRET}
                assert json.loads(done.payload) == {"secret": SECRET}
            assert await client.result(first_id) == {"secret": SECRET}
        finally:
            await worker.stop()

    # Results are sealed too (the worker's primary key), and nothing is in clear text.
    for task_id in (first_id, second.id):
        result = (await _stored(database_dsn, task_id))["result"]
        assert envelope_key_id(result) == "k2"
    assert await plaintext_in_database(database_dsn, SECRET) == []
    assert await plaintext_in_database(database_dsn, "application/json") == []

    # The CLI shows the task decrypted with the key file, and only then.
    shown = await conveyor(*with_keys, "get", first_id)
    assert shown.code == 0 and SECRET in shown.out, shown.err
    hidden = await conveyor("--coordinator", address, "get", first_id)
    assert hidden.code == 0 and SECRET not in hidden.out
    assert "payload:      (encrypted with key 'k1': --encryption-key-file" in hidden.out
    as_json = await conveyor("--coordinator", address, "get", first_id, "--json")
    assert json.loads(as_json.out)["payload"]["encrypted_with_key"] == "k1"


async def test_a_payload_that_does_not_open_fails_for_good(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """Sealed with other key material under the worker's key id, or not encrypted at all:
    every worker would see the same bytes, so the task fails at once and for good."""
    await coordinator.wait_serving()
    address = coordinator.address
    worker_keys, foreign_keys = tmp_path / "worker.json", tmp_path / "foreign.json"
    KeyRing.generate("k1").save(worker_keys)
    KeyRing.generate("k1").save(foreign_keys)  # the same id, other key material

    worker = DemoWorker(address, worker_keys, tmp_path)
    try:
        worker.start()
        async with (
            AsyncClient(address, codec=EncryptionCodec.from_key_file(foreign_keys)) as wrong,
            AsyncClient(address) as plain,
        ):
            cases = {
                (
                    await wrong.submit("echo", SECRET, max_attempts=3)
                ).id: "does not open with key 'k1'",
                (await plain.submit("echo", "plain", max_attempts=3)).id: "is not encrypted",
            }
            for task_id, reason in cases.items():
                done = await plain.wait(task_id, timeout=60)
                assert done.state is TaskState.DEAD, (done, worker.log_tail())
                assert done.attempt == 1  # not retried: another attempt sees the same bytes
                assert done.last_error is not None and reason in done.last_error, done.last_error
            assert worker.running  # the worker stays up
    finally:
        worker.close()
    assert await plaintext_in_database(database_dsn, SECRET) == []


async def _attempts_by_worker(dsn: str) -> dict[str, int]:
    rows = await _sql(dsn, "SELECT worker_id, count(*) AS n FROM task_attempts GROUP BY worker_id")
    return {r["worker_id"]: r["n"] for r in rows}


async def _workers(address: str, count: int) -> dict[str, admin_service_pb2.WorkerInfo]:
    """The connected workers by id, once there are ``count`` (GetClusterStatus)."""
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)

        async def connected() -> dict[str, admin_service_pb2.WorkerInfo] | None:
            reply = await admin.GetClusterStatus(
                admin_service_pb2.GetClusterStatusRequest(), timeout=5
            )
            return {w.worker_id: w for w in reply.workers} if len(reply.workers) == count else None

        found: dict[str, admin_service_pb2.WorkerInfo] = await eventually(
            connected, timeout=30, what=f"{count} workers connected"
        )
        return found


async def test_a_worker_without_the_key_leaves_the_tasks_to_one_that_has_it(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """The issue's scenario: 40 encrypted tasks, one worker with the key file and one
    without. The keyless worker is given none of them: all 40 succeed, and no attempt
    is spent on the worker that cannot open them."""
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    KeyRing.generate("k1").save(keys)
    keyless = DemoWorker(address, None, tmp_path / "keyless")
    keyed = DemoWorker(address, keys, tmp_path / "keyed")
    try:
        keyless.start()  # first, and idle: it would be the first to be handed work
        (without,) = await _workers(address, 1)
        keyed.start()
        await _workers(address, 2)
        async with AsyncClient(address, codec=EncryptionCodec.from_key_file(keys)) as client:
            tasks = await client.submit_many(
                [{"type": "echo", "payload": {"n": n}} for n in range(40)]
            )
            for task in tasks:
                done = await client.wait(task.id, timeout=60)
                assert done.state is TaskState.SUCCEEDED, (done, keyless.log_tail())
                assert done.attempt == 1 and done.uncounted_attempts == 0
        assert without not in await _attempts_by_worker(database_dsn)
        assert keyless.running
    finally:
        keyless.close()
        keyed.close()


async def test_a_task_nobody_can_open_waits_and_says_which_key(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """Sealed with a key no connected worker holds (a worker with another key file, one
    with none): the task waits, unserved, naming the key; it runs once a worker has it."""
    await coordinator.wait_serving()
    address = coordinator.address
    worker_keys = tmp_path / "worker.json"
    KeyRing.generate("k1").save(worker_keys)
    stranger = KeyRing.generate("stranger")
    workers = [
        DemoWorker(address, worker_keys, tmp_path / "keyed"),
        DemoWorker(address, None, tmp_path / "keyless"),
    ]
    try:
        for worker in workers:
            worker.start()
        await _workers(address, 2)
        async with (
            AsyncClient(address, codec=EncryptionCodec(stranger)) as unknown,
            AsyncClient(address, codec=EncryptionCodec.from_key_file(worker_keys)) as known,
        ):
            waiting = await unknown.submit("echo", SECRET)
            # A task after it runs: the workers were given work, just not that task.
            later = await known.submit("echo", {"n": 1})
            assert (await known.wait(later.id, timeout=60)).state is TaskState.SUCCEEDED
            seen = await unknown.get(waiting.id)
            assert seen.state is TaskState.PENDING and seen.attempt == 0
            assert seen.unserved and seen.unserved_encryption_key == "stranger"
            assert "holds encryption key 'stranger'" in seen.unserved_hint()
            shown = await conveyor("--coordinator", address, "get", waiting.id)
            assert "holds encryption key 'stranger'" in shown.out, shown.out
            # `conveyor status` shows which keys each worker holds.
            status = await conveyor("--coordinator", address, "status", "--json")
            held = {
                tuple(w.get("encryptionKeys", {}).get("keyIds", []))
                for w in json.loads(status.out)["workers"]
            }
            assert held == {(), ("k1",)}, status.out

            # The keyed worker's key file gains the key: it says so, and the task runs.
            worker_ring = KeyRing.load(worker_keys)
            both = KeyRing(
                {"k1": worker_ring._secrets["k1"], "stranger": stranger._secrets["stranger"]},
                "k1",
            )
            both.save(worker_keys)
            done = await unknown.wait(waiting.id, timeout=60)
            assert done.state is TaskState.SUCCEEDED and done.attempt == 1
            # (Its result is sealed with the worker's primary key, k1.)
            assert await known.result(waiting.id) == SECRET
    finally:
        for worker in workers:
            worker.close()


async def test_a_rotation_that_reaches_clients_first_waits_for_the_workers(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """The client's key file is rotated before the workers' copy: tasks under the new key
    wait (unserved, naming it) instead of failing, and run once the file reaches them."""
    await coordinator.wait_serving()
    address = coordinator.address
    client_keys, worker_keys = tmp_path / "client.json", tmp_path / "worker.json"
    ring = KeyRing.generate("k1")
    ring.save(client_keys)
    ring.save(worker_keys)
    worker = DemoWorker(address, worker_keys, tmp_path)
    try:
        worker.start()
        await _workers(address, 1)
        codec = EncryptionCodec.from_key_file(client_keys)
        async with AsyncClient(address, codec=codec) as client:
            before = await client.submit("echo", {"n": 0})
            assert (await client.wait(before.id, timeout=60)).state is TaskState.SUCCEEDED
            rotated = ring.rotated("k2")
            rotated.save(client_keys)
            await eventually(lambda: codec.keys.primary == "k2", what="the client's reread")
            tasks = await client.submit_many(
                [{"type": "echo", "payload": {"n": n}} for n in range(10)]
            )
            stored = await _stored(database_dsn, tasks[0].id)
            assert envelope_key_id(stored["payload"]) == "k2"
            seen = await client.get(tasks[-1].id)
            assert seen.state is TaskState.PENDING and seen.unserved_encryption_key == "k2"
            rotated.save(worker_keys)  # the rotation reaches the worker
            for task in tasks:
                done = await client.wait(task.id, timeout=60)
                assert done.state is TaskState.SUCCEEDED, (done, worker.log_tail())
                assert done.attempt == 1 and done.uncounted_attempts == 0
        assert "encryption keys changed to k1, k2" in worker.log_tail(200)
    finally:
        worker.close()


async def test_results_read_without_the_key_say_so(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    KeyRing.generate("k1").save(keys)
    codec = EncryptionCodec.from_key_file(keys)
    worker = DemoWorker(address, keys, tmp_path)
    try:
        worker.start()
        async with AsyncClient(address, codec=codec) as client, AsyncClient(address) as plain:
            task = await client.submit("echo", {"n": 1})
            assert await client.result(task.id, timeout=60) == {"n": 1}

            seen = await plain.get(task.id)
            assert seen.content_type == ENCRYPTED_CONTENT_TYPE
            with pytest.raises(Exception, match="encrypted with key 'k1'"):
                seen.json()
            with pytest.raises(Exception, match="has no key ring"):
                await plain.result(task.id, timeout=10)

            other = EncryptionCodec(KeyRing.generate("k9"))
            async with AsyncClient(address, codec=other) as stranger:
                left = await stranger.get(task.id)  # a read does not fail...
                assert left.content_type == ENCRYPTED_CONTENT_TYPE
                with pytest.raises(Exception, match="key 'k1', which is not in the key ring"):
                    await stranger.result(task.id, timeout=10)  # ... asking for the result does
    finally:
        worker.close()


async def test_schedule_templates_are_encrypted(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    KeyRing.generate("k1").save(keys)
    worker = DemoWorker(address, keys, tmp_path)
    try:
        worker.start()
        async with AsyncClient(address, codec=EncryptionCodec.from_key_file(keys)) as client:
            schedule = await client.create_schedule("tick", "* * * * * *", "echo", SECRET)
            assert schedule.json() == SECRET  # read back decrypted
            with pytest.raises(ValueError, match="must pass payload= when it changes type="):
                await client.update_schedule("tick", type="sleep")

            async def fired() -> str | None:
                page = await client.list(type="echo", state=TaskState.SUCCEEDED)
                return page.items[0].id if page.items else None

            task_id = await eventually(fired, timeout=60)
            assert await client.result(task_id) == SECRET
            # A new payload without a new type: the client reads the type to bind it.
            updated = await client.update_schedule("tick", payload={"v": 2})
            assert updated.json() == {"v": 2}
            await client.delete_schedule("tick")
    finally:
        worker.close()
    assert await plaintext_in_database(database_dsn, SECRET) == []


async def _sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    """Runs one statement in PostgreSQL, as anyone who can write to it can."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def _swap(dsn: str, table: str, column: str, first: str, second: str) -> None:
    """Swaps ``column`` of two rows of ``table``, and bumps ``version`` where there is one
    (so caches reread it)."""
    bump = ", version = t.version + 1" if table == "schedules" else ""
    await _sql(
        dsn,
        f"""
        UPDATE {table} t SET {column} = o.{column}{bump}
        FROM {table} o
        WHERE (t.id, o.id) IN (($1::uuid, $2::uuid), ($2::uuid, $1::uuid))
        """,
        first,
        second,
    )


async def test_a_payload_moved_to_another_task_or_schedule_does_not_open(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """Two encrypted `echo` tasks whose payloads are swapped in SQL: neither runs on the
    other's payload (each is refused, for good); likewise templates swapped between two
    schedules, and a fired task's payload moved onto a submitted task."""
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    KeyRing.generate("k1").save(keys)
    codec = EncryptionCodec.from_key_file(keys)
    async with AsyncClient(address, codec=codec) as client:
        # Submitted while no worker runs, so they wait for the swap.
        alice = await client.submit("echo", {"pay": "alice"}, max_attempts=3)
        bob = await client.submit("echo", {"pay": "bob"}, idempotency_key="order-bob")
        await _swap(database_dsn, "tasks", "payload", alice.id, bob.id)
        # Two schedules of one type, made paused; their templates swapped, then resumed.
        first = await client.create_schedule("first", "* * * * * *", "echo", "1", paused=True)
        second = await client.create_schedule("second", "* * * * * *", "echo", "2", paused=True)
        await _swap(database_dsn, "schedules", "template", first.id, second.id)
        await client.resume_schedule("first")
        await client.resume_schedule("second")
        fired = await eventually(
            lambda: _first_fired(database_dsn, first.id), timeout=30, what="a firing"
        )
        # A fired task's payload moved onto a submitted task of the same type.
        carol = await client.submit("echo", {"pay": "carol"})
        await _copy_payload(database_dsn, fired, carol.id)

        worker = DemoWorker(address, keys, tmp_path)
        try:
            worker.start()
            for task_id in (alice.id, bob.id, carol.id):
                done = await client.wait(task_id, timeout=60)
                assert done.state is TaskState.DEAD, (done, worker.log_tail())
                assert done.attempt == 1 and not done.result  # it never ran
                assert done.last_error and "does not open with key 'k1'" in done.last_error
            assert "cannot decrypt task" in worker.log_tail()
            # Every firing of the swapped schedules is refused the same way.
            for schedule in (first, second):
                task_id = await eventually(
                    lambda s=schedule: _first_fired(database_dsn, s.id, dead=True),  # type: ignore[misc]
                    timeout=30,
                    what=f"a dead firing of {schedule.name}",
                )
                done = await client.get(task_id)
                assert not done.result and "does not open" in (done.last_error or "")
        finally:
            await worker.stop()
    assert await plaintext_in_database(database_dsn, "alice") == []


async def _first_fired(dsn: str, schedule_id: str, *, dead: bool = False) -> str | None:
    rows = await _sql(
        dsn,
        "SELECT id::text FROM tasks WHERE idempotency_key LIKE $1 AND ($2 = false OR state = 5)"
        " ORDER BY id LIMIT 1",
        f"schedule:{schedule_id}:%",
        dead,
    )
    return str(rows[0]["id"]) if rows else None


async def _copy_payload(dsn: str, source: str, target: str) -> None:
    await _sql(
        dsn,
        "UPDATE tasks t SET payload = s.payload FROM tasks s "
        "WHERE s.id = $1::uuid AND t.id = $2::uuid",
        source,
        target,
    )


async def test_a_worker_that_lost_a_key_gives_the_task_back_uncounted(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    """The safety net: a worker that named a key in Hello but lacks it after all reports
    KEY_UNAVAILABLE. The task goes back at once, the attempt not counted, and that worker
    is given no more of the key's tasks (a plaintext task behind it comes to it first)."""
    await coordinator.wait_serving()
    address = coordinator.address
    keys = tmp_path / "keys.json"
    KeyRing.generate("k1").save(keys)
    raw = RawWorker(address)
    try:
        await raw.connect("forgetful", credits=1, encryption_keys=("k1",))
        async with (
            AsyncClient(address, codec=EncryptionCodec.from_key_file(keys)) as client,
            AsyncClient(address) as plain,
        ):
            sealed = await client.submit("echo", {"n": 1})
            (assignment,) = await raw.assignments(1)
            assert assignment.lease.task_id == sealed.id
            await raw.send(
                results=worker_service_pb2.Results(
                    results=[
                        worker_service_pb2.TaskResult(
                            lease=assignment.lease,
                            outcome=worker_service_pb2.TASK_OUTCOME_KEY_UNAVAILABLE,
                            key_id="k1",
                            error="key k1 is not in this worker's ring",
                        )
                    ]
                )
            )
            acks = await raw.receive_kind("result_acks")
            assert acks.acks[0].accepted, acks
            back = await client.get(sealed.id)
            assert back.state is TaskState.PENDING and back.attempts_counted == 0, back
            # Behind the sealed task in the queue, a plaintext one: the worker gets that.
            later = await plain.submit("echo", "plain")
            await raw.send(credit=worker_service_pb2.Credit(credits=1))
            (second,) = await raw.assignments(1)
            assert second.lease.task_id == later.id
            # A worker with the key runs the sealed task; one attempt in all counted.
            worker = DemoWorker(address, keys, tmp_path)
            try:
                worker.start()
                done = await client.wait(sealed.id, timeout=60)
            finally:
                await worker.stop()
            assert done.state is TaskState.SUCCEEDED
            assert (done.attempt, done.uncounted_attempts) == (2, 1)
            _, attempts = await plain.get_with_attempts(sealed.id)
            assert attempts[0].worker_id == "forgetful"
            assert attempts[0].outcome is AttemptOutcome.NOT_STARTED
            assert "k1" in (attempts[0].error or "")
    finally:
        await raw.close()
