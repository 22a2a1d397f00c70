"""Bad keys and attacks, against a coordinator process that requires keys: missing,
malformed, unknown, expired and revoked keys on unary calls and on open streams (WatchTask,
worker Connect), a key in the wrong header or inside a URL, metadata over 16 KiB, and a
brute-force attempt (throttled per peer, in the audit log as a few aggregated rows)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2
from security import Keys, bearer, call, running, secure_coordinator, stream_answer
from testsupport import RawWorker, eventually, health_stub

from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc

pytestmark = pytest.mark.slow

CODE = grpc.StatusCode
ENDS_WITHIN = 1.0
"""The issue's bound: a revoked or expired key's open streams end within a second."""


def _request_of(method: str) -> object:
    """An empty request of the method's type (what is in it does not matter here)."""
    from google.protobuf import descriptor_pool, message_factory

    service, name = method.strip("/").split("/")
    descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    return message_factory.GetMessageClass(descriptor.input_type)()


async def test_every_rpc_refuses_calls_without_a_valid_key(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    # No throttle here: this test fails on purpose more often than a peer may.
    process = secure_coordinator(
        database_dsn, tmp_path, admin_key, extra_args=["--auth-failure-burst", "0"]
    )
    async with (
        running(process) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        keys = Keys(channel, admin_key)
        revoked = await keys.create("acme", *api_keys.ALL_SCOPES)
        await keys.revoke(revoked.id)
        _, unknown = api_keys.generate()
        key_id = api_keys.parse(admin_key)
        wrong_secret = f"cvk_{key_id}_{unknown.split('_', 2)[2]}"
        cases = {
            "missing": (),
            "malformed": bearer("hunter2"),
            "unknown": bearer(unknown),
            "unknown ": bearer(wrong_secret),  # a real id with a wrong secret
            "revoked": bearer(revoked.key),
        }
        for method in sorted(api_keys.required_scopes()):
            if method.endswith("/Connect"):
                continue  # the stream: below
            streaming = method in api_keys.streaming_methods()
            for problem, metadata in cases.items():
                answer = await call(
                    channel, method, _request_of(method), metadata, streaming=streaming
                )
                assert (answer.code, answer.reason) == (
                    CODE.UNAUTHENTICATED,
                    "UNAUTHENTICATED",
                ), (method, problem, answer)
        for problem, metadata in cases.items():
            worker = RawWorker(coordinator.address)
            try:
                with pytest.raises(grpc.aio.AioRpcError):
                    await worker.connect("w", metadata=metadata, pulse=False)
                answer = await stream_answer(worker.call)
                assert answer.code == CODE.UNAUTHENTICATED, (problem, answer)
            finally:
                await worker.close()
        # An expired key: it works until its time, then not.
        expired = await keys.create(
            "acme", "read", expire_time=datetime.now(UTC) + timedelta(seconds=1)
        )
        listing = task_service_pb2.ListQueuesRequest()
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        await stub.ListQueues(listing, metadata=expired.metadata)

        async def refused() -> bool:
            answer = await call(
                channel, "/conveyor.v1.TaskService/ListQueues", listing, expired.metadata
            )
            return answer.code == CODE.UNAUTHENTICATED and "expired" in answer.details

        await eventually(refused, timeout=3)
        # Health and reflection stay open.
        reply = await health_stub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


_Watch = grpc.aio.UnaryStreamCall[
    task_service_pb2.WatchTaskRequest, task_service_pb2.WatchTaskResponse
]


async def _open_watch(channel: grpc.aio.Channel, key: str, task_id: str) -> _Watch:
    stub: task_service_pb2_grpc.TaskServiceAsyncStub = task_service_pb2_grpc.TaskServiceStub(
        channel
    )
    stream = stub.WatchTask(task_service_pb2.WatchTaskRequest(id=task_id), metadata=bearer(key))
    first = await stream.read()
    assert isinstance(first, task_service_pb2.WatchTaskResponse) and first.task.id == task_id
    return stream


async def _ended(stream: _Watch | grpc.aio.StreamStreamCall[Any, Any], started: float) -> float:
    """Seconds from ``started`` until the stream ended; asserts it ended UNAUTHENTICATED."""
    async with asyncio.timeout(10):
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await stream.read() is not grpc.aio.EOF:
                pass
    took = time.monotonic() - started
    answer = await stream_answer(stream)
    assert answer.code == CODE.UNAUTHENTICATED, answer
    return took


async def test_open_streams_of_a_revoked_or_expired_key_end_within_a_second(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    async with (
        running(secure_coordinator(database_dsn, tmp_path, admin_key)) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        keys = Keys(channel, admin_key)
        submitter = await keys.create("acme", "submit")
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        task = (
            await stub.SubmitTask(
                task_service_pb2.SubmitTaskRequest(type="nobody-serves-this"),
                metadata=submitter.metadata,
            )
        ).task
        # Revoked: a WatchTask and a worker stream of the key, and one of another key
        # that must stay open.
        reader = await keys.create("acme", "read", "worker")
        other = await keys.create("acme", "read")
        watch = await _open_watch(channel, reader.key, task.id)
        kept = await _open_watch(channel, other.key, task.id)
        worker = RawWorker(coordinator.address)
        try:
            await worker.connect("w1", metadata=reader.metadata, pulse=False)
            started = time.monotonic()
            await keys.revoke(reader.id)
            assert await _ended(watch, started) < ENDS_WITHIN
            assert await _ended(worker.call, started) < ENDS_WITHIN
        finally:
            await worker.close()
        assert not kept.done()
        kept.cancel()
        # Expired: the stream ends at the key's expire_time.
        expiry = datetime.now(UTC) + timedelta(seconds=1.5)
        short = await keys.create("acme", "read", expire_time=expiry)
        watch = await _open_watch(channel, short.key, task.id)
        until_expiry = expiry.timestamp() - time.time()
        took = await _ended(watch, time.monotonic())
        assert until_expiry - 0.05 <= took < until_expiry + ENDS_WITHIN


async def test_keys_in_the_wrong_place_and_oversized_metadata(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    async with (
        running(secure_coordinator(database_dsn, tmp_path, admin_key)) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        key = (await Keys(channel, admin_key).create("acme", "read")).key
        secret = key.split("_", 2)[2]
        method = "/conveyor.v1.TaskService/ListQueues"
        request = task_service_pb2.ListQueuesRequest()
        misplaced = {
            "the wrong header": (("x-api-key", key),),
            "no scheme": (("authorization", key),),
            "another scheme": (("authorization", f"Token {key}"),),
            "in a URL": (("authorization", f"Bearer https://example.com/hook?api_key={key}"),),
            "in a URL, no scheme": (("authorization", f"https://user:{key}@example.com/"),),
        }
        for where, metadata in misplaced.items():
            answer = await call(channel, method, request, metadata)
            assert answer.code == CODE.UNAUTHENTICATED, (where, answer)
            assert secret not in answer.details, where
        wrong_header = await call(channel, method, request, misplaced["the wrong header"])
        assert "'x-api-key'" in wrong_header.details
        # Metadata past 16 KiB: refused by gRPC before anything of ours runs; up to it, a
        # long authorization value is just a malformed key.
        big = (("authorization", f"Bearer {key}"), ("x-padding", "a" * (17 << 10)))
        answer = await call(channel, method, request, big)
        assert answer.code == CODE.RESOURCE_EXHAUSTED and "metadata" in answer.details
        long_value = (("authorization", "Bearer " + "a" * (15 << 10)),)
        answer = await call(channel, method, request, long_value)
        assert (answer.code, answer.reason) == (CODE.UNAUTHENTICATED, "UNAUTHENTICATED")
        # And the coordinator serves everyone else as before.
        assert (await call(channel, method, request, bearer(key))).code == CODE.OK
    log = coordinator.log_path.read_text()
    assert secret not in log  # never logged either


async def test_brute_force_is_throttled_per_peer_and_aggregated_in_the_audit_log(
    database_dsn: str, tmp_path: Path
) -> None:
    _, admin_key = api_keys.generate()
    burst, rate, attempts = 30, 2.0, 40  # the coordinator's defaults; 10 past the burst
    async with (
        running(secure_coordinator(database_dsn, tmp_path, admin_key)) as coordinator,
        grpc.aio.insecure_channel(coordinator.address) as channel,
    ):
        method = "/conveyor.v1.TaskService/ListQueues"
        request = task_service_pb2.ListQueuesRequest()
        codes = []
        for attempt in range(attempts):
            if attempt == burst:
                past_burst = time.monotonic()
            _, guess = api_keys.generate()
            codes.append((await call(channel, method, request, bearer(guess))).code)
        took = time.monotonic() - past_burst
        # The burst is refused as unknown keys; past it the peer is throttled: its calls
        # are refused unchecked (RESOURCE_EXHAUSTED, RetryInfo) and answered only when the
        # RetryInfo it ignored runs out, so it gets no more than `rate` guesses a second.
        assert codes[:burst] == [CODE.UNAUTHENTICATED] * burst
        assert set(codes[burst:]) == {CODE.UNAUTHENTICATED, CODE.RESOURCE_EXHAUSTED}
        checked = codes[burst:].count(CODE.UNAUTHENTICATED)
        assert checked <= took * rate + 1, (checked, took)
        # A good key from the throttled peer is refused unchecked too (checking it would
        # let the peer go on guessing).
        extra = 0
        while extra < 5:  # a guess that is checked (and fails) uses the token back
            extra += 1
            _, guess = api_keys.generate()
            if (await call(channel, method, request, bearer(guess))).code == (CODE.UNAUTHENTICATED):
                break
        throttled = await call(channel, method, request, bearer(admin_key))
        assert (throttled.code, throttled.reason) == (CODE.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        assert "failed authentications" in throttled.details
    # Every attempt is counted in the log, in a few aggregated rows, not a row each.
    conn = await asyncpg.connect(database_dsn)
    try:
        rows = await conn.fetch(
            "SELECT action, peer, detail FROM audit_events WHERE action IN "
            "('authentication_failed', 'authentication_throttled')"
        )
    finally:
        await conn.close()
    counted = sum(int(r["detail"].split("count=", 1)[1].split(";", 1)[0]) for r in rows)
    assert counted == attempts + extra + 1  # the last guesses and the admin key's call too
    assert len(rows) < 10 and {r["peer"] for r in rows} == {"127.0.0.1"}


async def test_bad_keys_over_ipv6_are_throttled_per_host_not_per_connection(
    database_dsn: str, tmp_path: Path
) -> None:
    """gRPC writes an IPv6 peer as ``ipv6:%5B::1%5D:PORT``: every connection from one host
    must share one bucket, as over IPv4, or the throttle does nothing."""
    _, admin_key = api_keys.generate()
    burst, rate, connections, guesses = 12, 0.5, 6, 5  # 30 guesses, each connection < burst
    process = secure_coordinator(
        database_dsn,
        tmp_path,
        admin_key,
        host="[::1]",
        extra_args=["--auth-failure-burst", str(burst), "--auth-failure-rate", str(rate)],
    )
    method = "/conveyor.v1.TaskService/ListQueues"
    request = task_service_pb2.ListQueuesRequest()

    async def guess_over_own_connection() -> list[grpc.StatusCode]:
        # A subchannel pool of its own: this channel's calls go over a new TCP connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(coordinator.address, options=options) as channel:
            return [
                (await call(channel, method, request, bearer(api_keys.generate()[1]))).code
                for _ in range(guesses)
            ]

    async with running(process) as coordinator:
        assert coordinator.address.startswith("[::1]:")
        started = time.monotonic()
        codes = [c for batch in await asyncio.gather(
            *(guess_over_own_connection() for _ in range(connections))
        ) for c in batch]  # fmt: skip
        took = time.monotonic() - started
        # One bucket for [::1]: past the burst (and what the rate gave back meanwhile),
        # calls are refused unchecked.
        checked = codes.count(CODE.UNAUTHENTICATED)
        assert set(codes) == {CODE.UNAUTHENTICATED, CODE.RESOURCE_EXHAUSTED}, codes
        assert checked <= burst + took * rate + 1, (checked, took)
    conn = await asyncpg.connect(database_dsn)
    try:
        peers = await conn.fetch(
            "SELECT DISTINCT peer FROM audit_events WHERE action IN "
            "('authentication_failed', 'authentication_throttled')"
        )
    finally:
        await conn.close()
    # The audit log names the host the same way, not one row per connection's port.
    assert [r["peer"] for r in peers] == ["::1"]
