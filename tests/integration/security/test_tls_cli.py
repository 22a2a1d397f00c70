"""The TLS flags and environment variables of the real ``conveyor`` command: a mutual-TLS
coordinator process, a worker process configured by the environment, and one-shot
commands configured by flags before and after the command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from clitools import (
    banner_commands,
    conveyor,
    dev_data_dir,
    dev_process,
    remove_dev_data,
    shell,
)
from cluster import CoordinatorProcess, WorkerProcess, health_status
from processes import free_port
from tlsfiles import TLSFiles, make_tls_files

from conveyor.client import tls_credentials

REPO = Path(__file__).resolve().parents[3]


class TLSCoordinatorProcess(CoordinatorProcess):
    """``conveyor coordinator`` serving mutual TLS; its health is checked over TLS."""

    def __init__(self, dsn: str, files: TLSFiles, log_dir: Path) -> None:
        super().__init__(
            dsn,
            None,
            log_dir=log_dir,
            extra_args=[
                "--tls-cert", str(files.cert_file),
                "--tls-key", str(files.key_file),
                "--tls-client-ca", str(files.ca_file),
            ],
        )  # fmt: skip
        self.credentials = tls_credentials(
            files.ca_file, files.client_cert_file, files.client_key_file
        )

    async def health(self, timeout: float = 1.0) -> int | None:
        return await health_status(self.address, timeout, self.credentials)


@pytest.fixture
def files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def coordinator(database_dsn: str, files: TLSFiles, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = TLSCoordinatorProcess(database_dsn, files, tmp_path)
    try:
        yield process.start()
    finally:
        process.close()


async def test_cli_and_worker_over_mutual_tls(
    coordinator: CoordinatorProcess, files: TLSFiles, tmp_path: Path
) -> None:
    await coordinator.wait_serving()
    address = coordinator.address
    # The worker takes everything from the environment.
    worker = WorkerProcess(
        address,
        tmp_path / "effects.log",
        log_dir=tmp_path,
        env={
            "CONVEYOR_TLS_CA": str(files.ca_file),
            "CONVEYOR_TLS_CERT": str(files.client_cert_file),
            "CONVEYOR_TLS_KEY": str(files.client_key_file),
        },
    )
    # Flags before the command...
    before = [
        "--coordinator", address,
        "--tls-ca", str(files.ca_file),
        "--tls-cert", str(files.client_cert_file),
        "--tls-key", str(files.client_key_file),
    ]  # fmt: skip
    try:
        worker.start()
        done = await conveyor(*before, "submit", "noop", "--wait", "--wait-timeout", "60", "--json")
        assert done.code == 0, done.err + worker.log_tail()
        task = json.loads(done.out)
        assert task["state"] == "SUCCEEDED" and task["result"] == "ok"

        # ... and after it (get reads through the CLI's raw channel, status and health too).
        after = [*before[2:], "--coordinator", address]
        shown = await conveyor("get", task["id"], "--json", *after)
        assert shown.code == 0, shown.err
        assert json.loads(shown.out)["state"] == "SUCCEEDED"
        status = await conveyor("status", *after)
        assert status.code == 0, status.err
        assert "noop" in status.out  # the worker, connected over mutual TLS, and its types
        health = await conveyor("health", *after)
        assert (health.code, health.out.strip()) == (0, f"{address} SERVING")

        # Without a client certificate the coordinator lets nobody in.
        refused = await conveyor("health", "--coordinator", address, "--tls-ca", str(files.ca_file))
        assert (refused.code, refused.out.strip()) == (1, f"{address} UNREACHABLE")
        stranger = tmp_path / "stranger-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(stranger))
        untrusted = await conveyor(
            "get", task["id"], "--coordinator", address, "--tls-ca", str(stranger)
        )
        assert untrusted.code == 1
        assert untrusted.err.startswith(
            f"conveyor: the TLS handshake with {address} failed (CERTIFICATE_VERIFY_FAILED"
        ), untrusted.err
        # Issue 20, break 3: these read "cannot reach the coordinator ...: is it running?".
        plain, no_cert = await asyncio.gather(
            conveyor("get", task["id"], "--coordinator", address, "--rpc-timeout", "2"),
            conveyor(
                "get", task["id"], "--coordinator", address, "--tls-ca", str(files.ca_file),
                "--rpc-timeout", "2",
            ),
        )  # fmt: skip
        assert plain.code == 1 and "it probably serves TLS; pass --tls-ca" in plain.err, plain
        assert no_cert.code == 1 and "requires a client certificate" in no_cert.err, no_cert
    finally:
        worker.close()


async def test_bad_tls_files_fail_in_one_line(files: TLSFiles, tmp_path: Path) -> None:
    # The coordinator checks its files before it connects to anything (this DSN is unused).
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    missing = str(tmp_path / "missing.pem")
    done = await conveyor(
        "coordinator", "--dsn", dsn, "--listen", "127.0.0.1:0",
        "--tls-cert", missing, "--tls-key", str(files.key_file),
    )  # fmt: skip
    assert done.code == 1
    assert (
        done.err.strip() == f"conveyor: server certificate (--tls-cert) {missing!r} does not exist"
    )

    done = await conveyor(
        "coordinator", "--dsn", dsn, "--listen", "127.0.0.1:0",
        "--tls-cert", str(files.cert_file), "--tls-key", str(files.client_key_file),
    )  # fmt: skip
    assert done.code == 1 and "does not belong to server certificate" in done.err
    assert len(done.err.strip().splitlines()) == 1

    done = await conveyor("coordinator", "--dsn", dsn, "--tls-client-ca", str(files.ca_file))
    assert done.code == 2 and "--tls-client-ca) needs TLS" in done.err

    # A client with half a pair, or a key for a CA flag: one line each.
    done = await conveyor("--tls-cert", str(files.client_cert_file), "queues")
    assert done.code == 1 and "needs both files" in done.err
    done = await conveyor("queues", "--tls-ca", str(files.client_key_file))
    assert done.code == 1
    assert "CA file (--tls-ca)" in done.err and "holds no PEM certificate" in done.err


@pytest.mark.slow
async def test_dev_with_tls_and_encryption(files: TLSFiles, tmp_path: Path) -> None:
    """``conveyor dev`` serves TLS and its demo worker encrypts: the banner's commands
    carry the flags they need and work as printed."""
    keys = tmp_path / "keys.json"
    made = await conveyor("encryption", "new-key", "--key-file", str(keys))
    assert made.code == 0, made.err
    data_dir = dev_data_dir()
    address = f"127.0.0.1:{free_port()}"
    security = [
        "--tls-cert", str(files.cert_file), "--tls-key", str(files.key_file),
        "--tls-ca", str(files.ca_file), "--encryption-key-file", str(keys),
    ]  # fmt: skip
    try:
        async with dev_process(data_dir, address, *security, cwd=REPO) as dev:
            banner = await dev.read_until("Press Ctrl-C")
            assert f"--tls-ca {files.ca_file}" in banner
            assert f"--encryption-key-file {keys}" in banner
            export, *commands = banner_commands(banner)
            assert export.startswith("export CONVEYOR_API_KEY="), export  # runs first
            assert len(commands) == 4, commands
            for command in commands:
                code, out = await shell(f"{export}\n{command}", REPO)
                assert code == 0, f"{command}\n{out}"
            code, out = await shell(f"{export}\n{commands[0]}", REPO)
            assert "succeeded" in out and "hello" in out  # decrypted for display
            # Plaintext is refused by the TLS coordinator.
            plain = await conveyor("queues", "--coordinator", address, "--rpc-timeout", "2")
            assert plain.code == 1
            assert await dev.interrupt() == 0, dev.output()
    finally:
        remove_dev_data(data_dir)
