"""Shared fixtures.

- `pg_dsn` (session): a PostgreSQL server. `CONVEYOR_TEST_DSN` when set, else an embedded
  server (fsync off) started once per session in a temporary folder and stopped at the end.
- `database_dsn` (function): a fresh, uniquely named database on that server, dropped
  afterwards. A plain sync fixture, so sync and async tests can both use it.
- `pg_tmpdir` (function): a temporary folder for an `EmbeddedPostgres` data dir (see below).
- `etcd_server` (function): one real etcd member on loopback; `etcd_cluster` (function):
  three. Stopped afterwards; they fail (never skip) when no etcd binary is found.

Markers: `integration` (every test under tests/integration gets it) and `slow`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from etcd_servers import EtcdCluster, EtcdNotFoundError, EtcdServer, find_etcd_binary

# Before anything imports gRPC (it reads this once): the tests start processes (pg_ctl,
# coordinators, workers) from a process full of gRPC threads, and gRPC's fork handlers
# can crash the child between fork and exec (pg_ctl died of SIGSEGV in CI).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


T = TypeVar("T")

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs real services (PostgreSQL, etcd); tests/integration"
    )
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)
    # Modules with slow tests run first (each module's tests stay together and in order,
    # for their module-scoped fixtures): pytest-xdist hands tests out in this order, and a
    # two-minute test started last held a whole run open on one process while the others
    # had finished.
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Captured output that is not valid UTF-8 (a test may log a lone surrogate on
    purpose) is escaped in the report: pytest-xdist sends reports between processes as
    UTF-8 and would crash on it, ending the whole run."""
    report = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]
    return report


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a helper thread.

    Safe from sync fixtures and tests, even while pytest-asyncio's session loop exists or
    runs in the main thread (asyncio.run there would clobber or refuse it).
    """

    async def main() -> T:
        return await factory()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conftest-async") as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


def make_pg_tmpdir() -> Path:
    """A temp folder for a PostgreSQL data dir, outside pytest's basetemp on purpose.

    As root the server runs as another user, which needs to traverse the folders above its
    data dir. pytest keeps /tmp/pytest-of-<user> at mode 0700 and resets it whenever any
    pytest process starts, which would cut a running server off from its own data dir.
    """
    return Path(tempfile.mkdtemp(prefix="conveyor-test-pg-"))


@pytest.fixture
def pg_tmpdir() -> Iterator[Path]:
    """A temp folder to use as an `EmbeddedPostgres` data dir; removed afterwards."""
    path = make_pg_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of the session's PostgreSQL server (database `postgres`)."""
    env_dsn = os.environ.get("CONVEYOR_TEST_DSN")
    if env_dsn:
        yield env_dsn
        return

    from conveyor.embedded import EmbeddedPostgres

    path = make_pg_tmpdir()
    server = EmbeddedPostgres(path / "pg", durable=False)
    try:
        yield server.start()
    finally:
        try:
            server.stop(mode="immediate")
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
def database_dsn(pg_dsn: str) -> Iterator[str]:
    """DSN of a fresh empty database, dropped (WITH (FORCE)) after the test."""
    import asyncpg

    name = f"test_{uuid.uuid4().hex[:20]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_async(lambda: execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(pg_dsn, name)
    finally:
        run_async(lambda: execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- etcd -------------------------------------------------------------------------------
#
# - `etcd_server` (function): one etcd member on loopback (a one-member cluster).
# - `etcd_cluster` (function): a static 3-member cluster on loopback.
# Both are stopped afterwards, checked to leave no process behind, and their data removed.
# No skipping: without an etcd binary these fail, saying how to get one.


def _etcd_binary_or_fail() -> None:
    try:
        find_etcd_binary()
    except EtcdNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def _assert_nothing_left(members: list[EtcdServer]) -> None:
    left = [m for m in members if m.process_group_alive()]
    assert not left, f"etcd processes left running after stop: {left}"


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """One running etcd member (``.endpoints``, ``.client_urls``), stopped afterwards."""
    _etcd_binary_or_fail()
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-etcd-"))
    server = EtcdServer(path / "etcd0")
    try:
        server.start()
        yield server
    finally:
        try:
            server.halt()
            _assert_nothing_left([server])
        finally:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A running 3-member etcd cluster (``.endpoints``, ``.client_urls``, ``.members``),
    stopped afterwards."""
    _etcd_binary_or_fail()
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-etcd-"))
    cluster = EtcdCluster(3, path)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
            _assert_nothing_left(cluster.members)
        finally:
            shutil.rmtree(path, ignore_errors=True)
