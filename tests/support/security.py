"""Helpers for the security tests (tests/integration/security): a coordinator process that
requires keys, keys made through the admin API, and calls that carry a key.

A coordinator here is a real process (``conveyor coordinator`` without ``--insecure``),
started with a bootstrap admin key (``CONVEYOR_BOOTSTRAP_KEY``) of tenant ``default``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from cluster import CoordinatorProcess
from google.protobuf import descriptor_pool, message_factory, timestamp_pb2
from testsupport import error_details

from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_service_pb2_grpc,
)

OK = grpc.StatusCode.OK


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``key``."""
    return (("authorization", f"Bearer {key}"),)


@dataclass(frozen=True)
class Key:
    """A key made for a test: its id, the whole key, its tenant and scopes."""

    id: str
    key: str
    tenant: str
    scopes: tuple[str, ...]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.key)


class Keys:
    """Makes and revokes keys through the admin API of the coordinator at ``address``."""

    def __init__(self, channel: grpc.aio.Channel, admin_key: str) -> None:
        self._admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self._metadata = bearer(admin_key)

    async def create(
        self,
        tenant: str,
        *scopes: str,
        expire_time: datetime | None = None,
        description: str = "test",
    ) -> Key:
        request = admin_service_pb2.CreateApiKeyRequest(
            tenant=tenant,
            scopes=[api_keys.scope_value(s) for s in scopes],
            description=description,
        )
        if expire_time is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(expire_time)
            request.expire_time.CopyFrom(stamp)
        reply = await self._admin.CreateApiKey(request, metadata=self._metadata, timeout=10)
        return Key(reply.key.id, reply.secret, tenant, tuple(scopes))

    async def revoke(self, key_id: str) -> None:
        await self._admin.RevokeApiKey(
            admin_service_pb2.RevokeApiKeyRequest(id=key_id), metadata=self._metadata, timeout=10
        )


def secure_coordinator(
    dsn: str,
    log_dir: Path,
    admin_key: str,
    *,
    name: str = "secure",
    etcd_endpoints: Sequence[str] | None = None,
    **kwargs: Any,
) -> CoordinatorProcess:
    """A coordinator process that requires keys, bootstrapped with ``admin_key``."""
    env = {"CONVEYOR_BOOTSTRAP_KEY": admin_key, **kwargs.pop("env", {})}
    return CoordinatorProcess(
        dsn, etcd_endpoints, log_dir=log_dir, name=name, insecure=False, env=env, **kwargs
    )


@contextlib.asynccontextmanager
async def running(process: CoordinatorProcess) -> AsyncIterator[CoordinatorProcess]:
    """Starts the process, waits until it serves, and stops it at the end."""
    process.start()
    try:
        await process.wait_serving()
        yield process
    finally:
        await process.stop()


@dataclass(frozen=True)
class Secured:
    """A running coordinator that requires keys, a channel to it, and its admin's Keys."""

    address: str
    channel: grpc.aio.Channel
    keys: Keys


@contextlib.asynccontextmanager
async def secured(dsn: str, log_dir: Path) -> AsyncIterator[Secured]:
    """A coordinator process that requires keys (bootstrapped with a new admin key)."""
    _, admin_key = api_keys.generate()
    async with (
        running(secure_coordinator(dsn, log_dir, admin_key)) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        yield Secured(coordinator.address, channel, Keys(channel, admin_key))


def tasks_stub(channel: grpc.aio.Channel) -> task_service_pb2_grpc.TaskServiceStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


def _response_class(method: str) -> Any:
    service, name = method.strip("/").split("/")
    descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    return message_factory.GetMessageClass(descriptor.output_type)


@dataclass(frozen=True)
class Answer:
    """How a call went: its code (OK or the error's), reason, and first response."""

    code: grpc.StatusCode
    reason: str | None = None
    response: Any = None
    details: str = ""


async def call(
    channel: grpc.aio.Channel,
    method: str,
    request: Any,
    metadata: Sequence[tuple[str, str]] = (),
    *,
    streaming: bool = False,
) -> Answer:
    """Calls any unary or server-streaming ``method`` (``/conveyor.v1.X/Y``); for a stream,
    the first response."""
    response_class = _response_class(method)
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    try:
        if streaming:
            stream = channel.unary_stream(method, **kwargs)(
                request, metadata=tuple(metadata), timeout=10
            )
            try:
                first = await stream.read()
            finally:
                stream.cancel()
            return Answer(OK, response=first)
        response = await channel.unary_unary(method, **kwargs)(
            request, metadata=tuple(metadata), timeout=10
        )
        return Answer(OK, response=response)
    except grpc.aio.AioRpcError as err:
        return answer_of(err)


def answer_of(err: grpc.aio.AioRpcError) -> Answer:
    """A failed call's Answer; the reason only when the status carries one (gRPC's own
    refusals, such as oversized metadata, carry none)."""
    rich = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    reason = error_details(err).reason if rich else None
    return Answer(err.code(), reason, details=err.details() or "")


async def stream_answer(call_: Any) -> Answer:
    """How a stream call ended, from the status the server sent (a raw client that was still
    writing may raise gRPC's own INTERNAL about its failed write instead)."""
    code = await call_.code()
    if code == OK:
        return Answer(OK)
    details = await call_.details()
    trailing = await call_.trailing_metadata()
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)
    return answer_of(error)
