"""EmbeddedPostgres: start, connect, stop, restart on the same data dir, crash recovery,
and ownership: a second owner is refused, a server another process uses is never stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from conveyor.embedded import EmbeddedPostgres, EmbeddedPostgresBusyError, EmbeddedPostgresError


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_start_connect_stop(pg_tmpdir: Path) -> None:
    pg = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    try:
        dsn = pg.start()
        assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.dsn("other") == f"postgresql://postgres@127.0.0.1:{pg.port}/other"
        assert pg.is_running()
        assert pg.start() == dsn  # idempotent
        assert await _fetchval(dsn, "SHOW server_encoding") == "UTF8"
        assert await _fetchval(dsn, "SHOW fsync") == "off"
        assert await _fetchval(dsn, "SHOW max_connections") == "200"
        assert await _fetchval(dsn, "SELECT current_user") == "postgres"
    finally:
        pg.stop()
    assert not pg.is_running()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await _fetchval(dsn, "SELECT 1")
    pg.stop()  # no-op when stopped


async def test_restart_keeps_data_and_port(pg_tmpdir: Path) -> None:
    data_dir = pg_tmpdir / "pg"
    with EmbeddedPostgres(data_dir) as pg:
        dsn = pg.dsn()
        port = pg.port
        assert await _fetchval(dsn, "SHOW fsync") == "on"
        await _execute(dsn, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hello')")
    assert (data_dir / "port").read_text().strip() == str(port)

    # A new object on the same dir reuses the recorded port (free again) and the data.
    with EmbeddedPostgres(data_dir) as again:
        assert again.port == port
        assert await _fetchval(again.dsn(), "SELECT v FROM kept") == "hello"


async def test_recorded_port_taken_picks_another(pg_tmpdir: Path) -> None:
    data_dir = pg_tmpdir / "pg"
    with EmbeddedPostgres(data_dir, durable=False) as pg:
        port = pg.port
    with socket.socket() as blocker:
        # The stopped server's port may linger in TIME_WAIT; a listener may still take it.
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with EmbeddedPostgres(data_dir, durable=False) as pg:
            assert pg.port != port
            assert await _fetchval(pg.dsn(), "SELECT 1") == 1


async def test_kill_then_start_recovers(pg_tmpdir: Path) -> None:
    pg = EmbeddedPostgres(pg_tmpdir / "pg")
    try:
        dsn = pg.start()
        await _execute(dsn, "CREATE TABLE survived (v int); INSERT INTO survived VALUES (42)")
        pg.kill()
        assert not pg.is_running()
        assert (pg.pgdata / "postmaster.pid").exists()  # stale, as after a crash

        # A fresh object, as a restarted `conveyor dev` would make.
        pg = EmbeddedPostgres(pg_tmpdir / "pg")
        assert pg.start() == dsn
        assert await _fetchval(dsn, "SELECT v FROM survived") == 42
    finally:
        pg.stop()


@pytest.mark.parametrize("reuser", ["init", "other_postgres"])
def test_stale_pidfile_with_reused_pid(pg_tmpdir: Path, reuser: str) -> None:
    """A stale postmaster.pid whose pid now belongs to another live process (pid 1, or
    another cluster's postmaster) must neither block a start nor be adopted."""
    pg = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    other = EmbeddedPostgres(pg_tmpdir / "other", durable=False)
    try:
        pg.start()
        pg.kill()
        if reuser == "init":
            pid = 1
        else:
            other.start()
            pid = int((other.pgdata / "postmaster.pid").read_text().split()[0])
        pidfile = pg.pgdata / "postmaster.pid"
        lines = pidfile.read_text().splitlines()
        lines[0] = str(pid)
        pidfile.write_text("\n".join(lines) + "\n")
        assert not pg.is_running()
        pg.start()
        assert pg.is_running()
        assert pg.port != other.port
        assert int(pidfile.read_text().split()[0]) != pid
    finally:
        pg.stop()
        other.stop()


def test_explicit_port_in_use_fails_with_log(pg_tmpdir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = EmbeddedPostgres(pg_tmpdir / "pg", port=port, durable=False)
        with pytest.raises(EmbeddedPostgresError, match="could not bind"):
            pg.start()
        assert not pg.is_running()


def test_conftest_database_dsn_sync(database_dsn: str, pg_dsn: str) -> None:
    assert database_dsn.rsplit("/", 1)[1].startswith("test_")
    assert database_dsn != pg_dsn


async def test_conftest_database_dsn_async(database_dsn: str) -> None:
    await _execute(database_dsn, "CREATE TABLE t (id int)")
    assert await _fetchval(database_dsn, "SELECT count(*) FROM t") == 0


async def test_second_owner_is_refused_and_cannot_stop_the_first(pg_tmpdir: Path) -> None:
    first = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    second = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    try:
        dsn = first.start()
        with pytest.raises(EmbeddedPostgresBusyError) as refused:
            second.start()
        assert refused.value.owner_pid == os.getpid()
        assert str(pg_tmpdir / "pg") in str(refused.value)
        with pytest.raises(EmbeddedPostgresBusyError):
            second.stop()
        with pytest.raises(EmbeddedPostgresError, match="owner"):
            second.kill()
        assert await _fetchval(dsn, "SELECT 1") == 1  # the first one's server is untouched
        first.stop()
        # Ownership is given up with the server: now the second may take over.
        assert second.start() != ""
        assert second.owned and not first.owned
    finally:
        second.stop()
        first.stop()


def _start_and_abandon(data_dir: Path) -> None:
    """Starts a server from another process that exits without stopping it (a crash)."""
    script = (
        "import os, sys\n"
        "from conveyor.embedded import EmbeddedPostgres\n"
        "EmbeddedPostgres(sys.argv[1], durable=False).start()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(data_dir)], check=True, timeout=120)


async def test_server_left_by_a_dead_owner_is_adopted(pg_tmpdir: Path) -> None:
    _start_and_abandon(pg_tmpdir / "pg")
    pg = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    assert pg.is_running()
    try:
        dsn = pg.start()
        assert await _fetchval(dsn, "SELECT 1") == 1
    finally:
        pg.stop()
    assert not pg.is_running()


def test_server_conveyor_did_not_start_is_never_adopted_or_stopped(pg_tmpdir: Path) -> None:
    _start_and_abandon(pg_tmpdir / "pg")
    record = pg_tmpdir / "pg" / "server.pid"
    ours = record.read_text()
    record.write_text("1\n")  # as if someone else had started this postmaster
    pg = EmbeddedPostgres(pg_tmpdir / "pg", durable=False)
    try:
        with pytest.raises(EmbeddedPostgresError, match="did not start"):
            pg.start()
        with pytest.raises(EmbeddedPostgresError, match="did not start"):
            pg.stop()
        assert pg.is_running()
        assert not pg.owned
    finally:
        record.write_text(ours)
        pg.stop()
    assert not pg.is_running()


def _ensure_user_in_child(name: str) -> str:
    from conveyor.embedded.postgres import _ensure_system_user

    return str(_ensure_system_user(name).pw_uid)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="creates a system user: needs root"
)
def test_processes_creating_the_system_user_at_once_all_get_it(tmp_path: Path) -> None:
    """On a fresh machine the suite's workers start their servers at the same moment: each
    must get the one system user (unserialized, some useradd calls failed and a server ran
    as a uid dropped from /etc/passwd). A throwaway user name stands in for the real one,
    which running servers use."""
    import multiprocessing
    import pwd

    name = f"cvy_probe_{os.getpid()}"
    try:
        with multiprocessing.get_context("spawn").Pool(8) as pool:
            uids = pool.map(_ensure_user_in_child, [name] * 8)
        assert len(set(uids)) == 1, uids
        assert str(pwd.getpwnam(name).pw_uid) == uids[0]
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
