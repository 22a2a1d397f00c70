"""The first key and the key on every side: a coordinator that requires keys from its first
start, the first admin key made with ``keys create --dsn`` (or brought with
``--bootstrap-key-file``), the CLI, the client and the worker SDK taking a key from a flag,
an argument or ``CONVEYOR_API_KEY``, ``--insecure`` saying so, and ``conveyor dev`` printing
the same key at every start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from clitools import conveyor, dev_data_dir, dev_process, remove_dev_data
from cluster import WorkerProcess
from processes import free_port
from security import Keys, running, secure_coordinator

from conveyor.client import AsyncClient, PermissionDeniedError, UnauthenticatedError
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.worker import Worker

pytestmark = pytest.mark.slow


async def test_a_cluster_from_its_first_key(database_dsn: str, tmp_path: Path) -> None:
    # No bootstrap key: the coordinator starts, refuses everyone, and says what to do.
    process = secure_coordinator(database_dsn, tmp_path, "", name="bare")
    process.extra_env.pop("CONVEYOR_BOOTSTRAP_KEY")
    async with running(process) as coordinator:
        where = ["--coordinator", coordinator.address]
        refused = await conveyor("queues", *where)
        assert refused.code == 1 and "no API key" in refused.err, refused.err
        assert "no API key with the admin scope exists" in coordinator.log_path.read_text()
        made = await conveyor(
            "keys", "create", "--dsn", database_dsn, "--tenant", "ops", "--scope", "admin"
        )
        assert made.code == 0, made.err
        admin_key = made.out.strip()
        # The admin key makes the others through the API.
        app = await conveyor(
            "keys", "create", "--tenant", "acme", "--scope", "submit,read",
            "--description", "the shop", "--expires-in", "30d", *where, "--api-key", admin_key,
        )  # fmt: skip
        assert app.code == 0, app.err
        app_key = app.out.strip()
        key_id = api_keys.parse(app_key)
        assert key_id is not None, app_key
        assert f"created API key {key_id} for tenant acme" in app.err
        # ... which the CLI takes from the environment as well as from --api-key.
        env = {"CONVEYOR_API_KEY": app_key}
        submitted = await conveyor("submit", "echo", '"hi"', *where, env=env)
        assert submitted.code == 0, submitted.err
        queues = await conveyor("queues", *where, env=env)
        assert queues.code == 0 and "default" in queues.out
        # status shows a tenant's key its own workers (issue 20, break 5); the cluster's
        # keys stay the admin's.
        status = await conveyor("status", *where, env=env)
        assert status.code == 0 and "need an admin key" in status.out, status
        denied = await conveyor("keys", "list", *where, env=env)
        assert denied.code == 1 and "'admin' scope" in denied.err, denied.err
        listed = await conveyor("keys", "list", "--tenant", "acme", *where, "--api-key", admin_key)
        assert listed.code == 0 and key_id in listed.out and "the shop" in listed.out
        assert app_key.split("_", 2)[2] not in listed.out
        revoked = await conveyor("keys", "revoke", key_id, *where, "--api-key", admin_key)
        assert revoked.code == 0 and f"revoked API key {key_id} (tenant acme)" in revoked.out
        refused = await conveyor("queues", *where, env=env)
        assert refused.code == 1 and "revoked" in refused.err
        listed = await conveyor("keys", "list", "--all", "--json", *where, "--api-key", admin_key)
        assert '"state": "revoked"' in listed.out


async def test_bootstrap_key_file_and_insecure(database_dsn: str, tmp_path: Path) -> None:
    generated = await conveyor("keys", "generate")
    key = generated.out.strip()
    assert generated.code == 0 and api_keys.parse(key) is not None
    key_file = tmp_path / "bootstrap.key"
    key_file.write_text(key + "\n")
    process = secure_coordinator(
        database_dsn, tmp_path, "", extra_args=["--bootstrap-key-file", str(key_file)]
    )
    process.extra_env.pop("CONVEYOR_BOOTSTRAP_KEY")
    async with running(process) as coordinator:
        status = await conveyor("status", "--coordinator", coordinator.address, "--api-key", key)
        assert status.code == 0, status.err
    # A key whose id is taken by another key stops the start, in one line.
    forged = f"cvk_{api_keys.parse(key)}_{api_keys.generate()[1].split('_', 2)[2]}"
    key_file.write_text(forged)
    started = await conveyor(
        "coordinator", "--dsn", database_dsn, "--listen", f"127.0.0.1:{free_port()}",
        "--bootstrap-key-file", str(key_file),
    )  # fmt: skip
    assert started.code == 1 and "belongs to another key" in started.err, started.err
    # --insecure: no keys needed, and the log says so loudly.
    open_ = secure_coordinator(database_dsn, tmp_path, "", name="open", extra_args=["--insecure"])
    async with running(open_) as coordinator:
        queues = await conveyor("queues", "--coordinator", coordinator.address)
        assert queues.code == 0, queues.err
    assert "AUTHENTICATION IS OFF (--insecure)" in open_.log_path.read_text()


async def test_client_and_worker_take_the_key_from_the_environment(
    database_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, admin_key = api_keys.generate()
    async with (
        running(secure_coordinator(database_dsn, tmp_path, admin_key)) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        keys = Keys(channel, admin_key)
        key = (await keys.create("acme", "submit", "read", "worker")).key
        reader = (await keys.create("acme", "read")).key
        monkeypatch.setenv("CONVEYOR_API_KEY", key)
        worker = Worker(coordinator.address)
        # The handler learns its task's tenant (the worker key's, from Welcome).
        worker.register("echo", lambda ctx, payload: {**payload, "tenant": ctx.tenant})
        run = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            async with AsyncClient(coordinator.address) as client:
                task = await client.submit("echo", {"from": "env"})
                result = await client.result(task.id, timeout=20)
                assert result == {"from": "env", "tenant": "acme"}
                assert task.tenant == "acme"
        finally:
            worker.shutdown(force=True)
            await asyncio.gather(run, return_exceptions=True)
        # An argument wins over the environment.
        async with AsyncClient(coordinator.address, api_key=reader) as client:
            with pytest.raises(PermissionDeniedError) as denied:
                await client.submit("echo", None)
        assert denied.value.scope == "submit"
        monkeypatch.setenv("CONVEYOR_API_KEY", "cvk_wrong")
        async with AsyncClient(coordinator.address) as client:
            with pytest.raises(UnauthenticatedError) as caught:
                await client.get(task.id)
        assert caught.value.problem == "malformed"
        # A worker process: the key from the environment, through `conveyor worker`.
        monkeypatch.setenv("CONVEYOR_API_KEY", key)
        effects = tmp_path / "effects.log"
        process = WorkerProcess(
            coordinator.address, effects, log_dir=tmp_path, env={"CONVEYOR_API_KEY": key}
        )
        process.start()
        try:
            async with AsyncClient(coordinator.address) as client:
                task = await client.submit("noop", None)
                await client.wait(task.id, timeout=30)
            assert task.id in effects.read_text()
        finally:
            await process.stop()


async def test_dev_prints_the_same_key_at_every_start() -> None:
    data_dir = dev_data_dir()
    address = f"127.0.0.1:{free_port()}"
    keys = []
    try:
        for _ in range(2):
            async with dev_process(data_dir, address) as dev:
                banner = await dev.read_until("Press Ctrl-C")
                line = next(x for x in banner.splitlines() if "export CONVEYOR_API_KEY=" in x)
                keys.append(line.split("=", 1)[1].strip())
                assert await dev.interrupt() == 0, dev.output()
        assert keys[0] == keys[1] and api_keys.parse(keys[0]) is not None
        assert (data_dir / "admin.key").stat().st_mode & 0o777 == 0o600
        async with dev_process(data_dir, address, "--insecure") as dev:
            banner = await dev.read_until("Press Ctrl-C")
            assert "authentication is off (--insecure)" in banner
            assert "CONVEYOR_API_KEY" not in banner
            assert await dev.interrupt() == 0, dev.output()
    finally:
        remove_dev_data(data_dir)
