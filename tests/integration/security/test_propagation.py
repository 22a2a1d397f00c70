"""A new or revoked key takes effect on every coordinator within a second, measured with real
processes: two coordinators elected through etcd (a key made or revoked on one, used on the
other), and a change made straight in the database (``conveyor keys --dsn``, no
coordinator involved, no etcd). The listener's reload on reconnect and the periodic full
reload are the safety nets; each is shown to catch a change NOTIFY did not deliver.

The figures are printed (``-s`` shows them); docs/architecture.md quotes them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from clitools import conveyor
from etcd_servers import EtcdServer
from security import Key, Keys, bearer, call, running, secure_coordinator
from testsupport import coordinator_config, eventually

from conveyor.coordinator import Coordinator
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import admin_service_pb2

pytestmark = pytest.mark.slow

CODE = grpc.StatusCode
WITHIN = 1.0
ROUNDS = 10
LIST_KEYS = "/conveyor.v1.AdminService/ListApiKeys"  # any coordinator answers it


async def _answer(channel: grpc.aio.Channel, key: str) -> grpc.StatusCode:
    request = admin_service_pb2.ListApiKeysRequest(page_size=1)
    return (await call(channel, LIST_KEYS, request, bearer(key))).code


async def _until(channel: grpc.aio.Channel, key: str, code: grpc.StatusCode) -> float:
    """Seconds until a call with ``key`` gets ``code`` (polled every 5 ms, for 5 s)."""
    started = time.monotonic()

    async def answered() -> bool:
        return await _answer(channel, key) == code

    await eventually(answered, timeout=5, interval=0.005, what=f"a {code.name} answer")
    return time.monotonic() - started


def _report(what: str, times: list[float]) -> None:
    ms = sorted(t * 1000 for t in times)
    print(f"\n{what}: {len(ms)} rounds, median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms")


async def test_keys_reach_the_other_coordinator_within_a_second(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    _, admin_key = api_keys.generate()
    etcd = etcd_server.endpoints
    first = secure_coordinator(database_dsn, tmp_path, admin_key, name="c1", etcd_endpoints=etcd)
    second = secure_coordinator(database_dsn, tmp_path, admin_key, name="c2", etcd_endpoints=etcd)
    async with (
        running(first),
        running(second),
        grpc.aio.insecure_channel(first.address) as one,
        grpc.aio.insecure_channel(second.address) as other,
    ):
        keys = Keys(one, admin_key)
        created: list[float] = []
        revoked: list[float] = []
        for _ in range(ROUNDS):
            key: Key = await keys.create("acme", "admin")
            created.append(await _until(other, key.key, CODE.OK))
            await keys.revoke(key.id)
            revoked.append(await _until(other, key.key, CODE.UNAUTHENTICATED))
        _report("new key usable on the other coordinator", created)
        _report("revoked key refused on the other coordinator", revoked)
        assert max(created) < WITHIN and max(revoked) < WITHIN


async def test_a_change_made_in_the_database_reaches_a_coordinator_without_etcd(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        made = await conveyor(
            "keys", "create", "--dsn", database_dsn, "--tenant", "ops", "--scope", "admin"
        )
        assert made.code == 0, made.err
        key = made.out.strip()
        assert api_keys.parse(key) is not None and "created API key" in made.err
        # The command ran for a while (a new Python process): the key may already work.
        assert await _until(channel, key, CODE.OK) < WITHIN
        gone = await conveyor("keys", "revoke", "--dsn", database_dsn, key)  # a whole key
        assert gone.code == 0 and key.split("_", 2)[2] not in gone.out
        assert await _until(channel, key, CODE.UNAUTHENTICATED) < WITHIN


async def test_the_listener_reloads_everything_when_it_reconnects(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    process = secure_coordinator(database_dsn, tmp_path, admin_key)
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        key = await Keys(channel, admin_key).create("ops", "admin")
        db = await asyncpg.connect(database_dsn)
        try:
            async with db.transaction():
                # The listener's connection dies; the revocation's NOTIFY goes to nobody
                # (the change commits while no listener is there).
                terminated = await db.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'conveyor-coordinator-listener'"
                )
                assert terminated == 1
                await db.execute("UPDATE api_keys SET revoke_time = now() WHERE id = $1", key.id)
            took = await _until(channel, key.key, CODE.UNAUTHENTICATED)
            print(f"\nrevocation during a listener reconnect: refused after {took * 1000:.0f} ms")
            assert took < WITHIN
        finally:
            await db.close()


async def test_the_periodic_reload_catches_a_change_without_notify(database_dsn: str) -> None:
    _, admin_key = api_keys.generate()
    coordinator = Coordinator(
        coordinator_config(
            database_dsn, authentication=True, bootstrap_key=admin_key, key_refresh=0.5
        )
    )
    await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            key = await Keys(channel, admin_key).create("ops", "admin")
            db = await asyncpg.connect(database_dsn)
            try:
                await db.execute("ALTER TABLE api_keys DISABLE TRIGGER api_keys_notify")
                await db.execute("UPDATE api_keys SET revoke_time = now() WHERE id = $1", key.id)
            finally:
                await db.close()
            assert coordinator.directory is not None
            reloads = coordinator.directory.reloads

            async def refused() -> bool:
                return await _answer(channel, key.key) == CODE.UNAUTHENTICATED

            await eventually(refused, timeout=5)
            assert coordinator.directory.reloads > reloads  # it was the reload, not NOTIFY
    finally:
        await coordinator.stop(grace=1.0)
