"""A worker whose API key cannot work stops, in one line, instead of retrying forever
(issue 15, item 9; issue 20, break 2).

A revoked or expired key is permanent, and so is a missing or malformed one: ``conveyor
worker`` exits 1 with one line that says what to do, and ``Worker.run()`` raises. A key the
coordinator does not know may be a new one still on its way: that is retried for a while
(``UNKNOWN_KEY_PATIENCE``), then the worker stops the same way. Real processes: a
coordinator that requires keys and ``conveyor worker --demo``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import processes
import pytest
from security import secured
from testsupport import eventually, sleep_until

from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.transport._errors import UnauthenticatedError
from conveyor.worker import Worker, _connection

pytestmark = pytest.mark.slow

# Far longer than a worker that stops takes; on main these workers ran until killed here.
STOPS_WITHIN = 30.0


async def _worker(address: str, key: str | None) -> processes.Completed:
    """``conveyor worker --demo`` with ``key`` (none: no key at all), run until it exits."""
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_API_KEY"}
    if key is not None:
        env["CONVEYOR_API_KEY"] = key
    return await processes.run(
        [sys.executable, "-m", "conveyor.cli.main", "--coordinator", address, "worker", "--demo"],
        env=env,
        timeout=STOPS_WITHIN,
    )


def _said_once(err: str, words: str) -> str:
    """The one stderr line with ``words``; fails when it is said more than once."""
    lines = [line for line in err.splitlines() if words in line]
    assert len(lines) == 1, err
    return lines[0]


async def test_a_worker_with_a_revoked_or_expired_key_stops_with_one_line(
    database_dsn: str, tmp_path: Path
) -> None:
    async with secured(database_dsn, tmp_path) as coordinator:
        address, keys = coordinator.address, coordinator.keys
        revoked = await keys.create("acme", "worker")
        await keys.revoke(revoked.id)
        expires = datetime.now(UTC) + timedelta(seconds=1)
        expired = await keys.create("acme", "worker", expire_time=expires)
        await sleep_until(expires)

        for key, problem in ((revoked, "revoked"), (expired, "expired")):
            done = await _worker(address, key.key)
            assert done.code == 1, done
            line = _said_once(done.err, f"API key {key.id} was {problem}")
            assert "ask an admin for a new one" in line


async def test_a_worker_stops_when_its_key_is_revoked_while_it_runs(
    database_dsn: str, tmp_path: Path
) -> None:
    async with secured(database_dsn, tmp_path) as coordinator:
        address, keys = coordinator.address, coordinator.keys
        key = await keys.create("acme", "worker")
        worker = Worker(address, api_key=key.key)
        worker.register("noop", lambda ctx, payload: None)
        run = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            async with asyncio.timeout(10):
                await worker.wait_connected()
            await keys.revoke(key.id)
            with pytest.raises(UnauthenticatedError) as caught:
                async with asyncio.timeout(STOPS_WITHIN):
                    await run
            assert caught.value.problem == "revoked"
            assert f"API key {key.id} was revoked" in str(caught.value)
        finally:
            worker.shutdown(force=True)
            if not run.done():
                run.cancel()
            await asyncio.gather(run, return_exceptions=True)


@pytest.mark.parametrize(
    ("key", "problem"),
    [(None, "no API key"), ("not-a-key", "not a Conveyor API key")],
)
async def test_a_worker_without_a_usable_key_stops_saying_how_to_get_one(
    database_dsn: str, tmp_path: Path, key: str | None, problem: str
) -> None:
    """Issue 20, break 2: it retried forever, about 43 log lines a minute."""
    async with secured(database_dsn, tmp_path) as coordinator:
        address = coordinator.address
        done = await _worker(address, key)
        assert done.code == 1, done
        line = _said_once(done.err, problem)
        assert "conveyor keys create" in line and "--api-key" in line


async def test_an_unknown_key_is_retried_for_a_while_then_the_worker_stops(
    database_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key the coordinator does not know may be a new one on its way there: a worker
    started with it connects once it arrives, and one that never arrives stops."""
    monkeypatch.setattr(_connection, "UNKNOWN_KEY_PATIENCE", 3.0)
    async with secured(database_dsn, tmp_path) as coordinator:
        address = coordinator.address
        _, never = api_keys.generate()
        lost = Worker(address, api_key=never)
        lost.register("noop", lambda ctx, payload: None)
        with pytest.raises(UnauthenticatedError) as caught:
            async with asyncio.timeout(STOPS_WITHIN):
                await lost.run(install_signal_handlers=False)
        assert caught.value.problem == "unknown"
        assert "still unknown after 3s" in str(caught.value)

        # A key that reaches the coordinator while the worker waits: it connects.
        caplog.clear()
        key_id, key = api_keys.generate()
        arriving = Worker(address, api_key=key)
        arriving.register("noop", lambda ctx, payload: None)
        run = asyncio.create_task(arriving.run(install_signal_handlers=False))
        try:
            await eventually(
                lambda: "does not know this worker's API key" in caplog.text,
                what="the worker refused for its unknown key",
            )
            db = await asyncpg.connect(database_dsn)
            try:
                await key_store.insert(
                    db,
                    key_id=key_id,
                    secret_hash=api_keys.secret_hash(key),
                    tenant="acme",
                    scopes=[api_keys.WORKER],
                    description="made elsewhere",
                    created_by="test",
                    expire_time=None,
                )
            finally:
                await db.close()
            async with asyncio.timeout(10):
                await arriving.wait_connected()
        finally:
            arriving.shutdown(force=True)
            await asyncio.gather(run, return_exceptions=True)
