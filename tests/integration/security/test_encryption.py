"""End-to-end payload encryption across real processes: a key file made and rotated with
``conveyor encryption``, tasks submitted under each key, one worker process with the
rotated ring running both, results read back, and PostgreSQL holding no plaintext."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from clitools import CLI, conveyor
from cluster import CoordinatorProcess
from processes import ManagedProcess
from testsupport import eventually

from conveyor.client import AsyncClient, EncryptionCodec, KeyRing, TaskState
from conveyor.transport import ENCRYPTED_CONTENT_TYPE
from conveyor.transport._encryption import envelope_key_id

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


async def test_missing_or_wrong_key_fails_the_task_for_good(
    coordinator: CoordinatorProcess, database_dsn: str, tmp_path: Path
) -> None:
    await coordinator.wait_serving()
    address = coordinator.address
    worker_keys, foreign_keys = tmp_path / "worker.json", tmp_path / "foreign.json"
    KeyRing.generate("k1").save(worker_keys)
    KeyRing.generate("k1").save(foreign_keys)  # the same id, other key material
    stranger = KeyRing.generate("stranger")

    worker = DemoWorker(address, worker_keys, tmp_path)
    bare = DemoWorker(address, None, tmp_path / "bare")
    try:
        worker.start()
        async with (
            AsyncClient(address, codec=EncryptionCodec.from_key_file(foreign_keys)) as wrong,
            AsyncClient(address, codec=EncryptionCodec(stranger)) as unknown,
            AsyncClient(address) as plain,
        ):
            cases = {
                (
                    await wrong.submit("echo", SECRET, max_attempts=3)
                ).id: "does not open with key 'k1'",
                (await unknown.submit("echo", SECRET, max_attempts=3)).id: (
                    "key 'stranger', which is not in the key ring (keys: k1)"
                ),
                (await plain.submit("echo", "plain", max_attempts=3)).id: "is not encrypted",
            }
            for task_id, reason in cases.items():
                done = await plain.wait(task_id, timeout=60)
                assert done.state is TaskState.DEAD, (done, worker.log_tail())
                assert done.attempt == 1  # not retried: another attempt sees the same bytes
                assert done.last_error is not None and reason in done.last_error, done.last_error
            assert worker.running  # the worker stays up

            # A worker without any key ring refuses encrypted payloads the same way.
            await worker.stop()
            bare.start()
            task = await unknown.submit("echo", SECRET)
            done = await plain.wait(task.id, timeout=60)
            assert done.state is TaskState.DEAD and done.attempt == 1, bare.log_tail()
            assert done.last_error and "is encrypted (key 'stranger')" in done.last_error
            assert "has no key ring" in done.last_error
    finally:
        worker.close()
        bare.close()
    assert await plaintext_in_database(database_dsn, SECRET) == []


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


async def _swap(dsn: str, table: str, column: str, first: str, second: str) -> None:
    """Swaps ``column`` of two rows of ``table`` in PostgreSQL (what anyone who can write
    to it can do), and bumps ``version`` where there is one (so caches reread it)."""
    conn = await asyncpg.connect(dsn)
    try:
        bump = ", version = t.version + 1" if table == "schedules" else ""
        await conn.execute(
            f"""
            UPDATE {table} t SET {column} = o.{column}{bump}
            FROM {table} o
            WHERE (t.id, o.id) IN (($1::uuid, $2::uuid), ($2::uuid, $1::uuid))
            """,
            first,
            second,
        )
    finally:
        await conn.close()


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
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT id::text FROM tasks WHERE idempotency_key LIKE $1 AND ($2 = false OR state = 5)"
            " ORDER BY id LIMIT 1",
            f"schedule:{schedule_id}:%",
            dead,
        )
        return str(value) if value is not None else None
    finally:
        await conn.close()


async def _copy_payload(dsn: str, source: str, target: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE tasks t SET payload = s.payload FROM tasks s "
            "WHERE s.id = $1::uuid AND t.id = $2::uuid",
            source,
            target,
        )
    finally:
        await conn.close()
