"""ConnectionOptions: the one place channels get their settings, metadata and interceptors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from conveyor.transport import MAX_MESSAGE_BYTES, ConnectionOptions
from conveyor.transport._errors import RPCError
from conveyor.transport._options import FLOW_CONTROL_OPTIONS
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc


def test_defaults_match_the_coordinator() -> None:
    options = dict(ConnectionOptions().channel_options())
    assert MAX_MESSAGE_BYTES == 64 << 20  # the coordinator's own send/receive limit
    assert options["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert options["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.http2.ping_timeout_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_reconnect_backoff_ms"] == 1000
    no_pings = dict(ConnectionOptions(keepalive_interval=None).channel_options())
    assert "grpc.keepalive_time_ms" not in no_pings


def test_flow_control_is_a_fixed_window_without_bdp_pings() -> None:
    options = dict(ConnectionOptions().channel_options())
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == 8 << 20
    assert set(FLOW_CONTROL_OPTIONS) <= set(ConnectionOptions().channel_options())


async def test_messages_larger_than_the_window_go_both_ways() -> None:
    # Without BDP probing the window no longer grows: a message of several windows must
    # still get through in each direction (WINDOW_UPDATEs as it is read).
    size = 3 * (8 << 20) + 1

    async def echo(request: bytes, context: Any) -> bytes:
        return request[::-1]

    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    limits = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = aio.server(options=[*limits, *FLOW_CONTROL_OPTIONS])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with ConnectionOptions().open_channel(f"127.0.0.1:{port}") as channel:
            call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/t.Echo/Echo")
            payload = bytes(range(256)) * (size // 256) + b"!"
            answer = await call(payload, timeout=60)
            assert answer == payload[::-1]
    finally:
        await server.stop(None)


def test_a_connect_timeout_sets_the_least_time_a_connection_attempt_is_given() -> None:
    # gRPC reads its minimum connect timeout from "min_reconnect_backoff_ms": unset, an
    # attempt gets no longer than the first backoff.
    assert dict(ConnectionOptions().channel_options())["grpc.min_reconnect_backoff_ms"] == 200
    patient = dict(ConnectionOptions(connect_timeout=20.0).channel_options())
    assert patient["grpc.min_reconnect_backoff_ms"] == 20_000
    assert patient["grpc.initial_reconnect_backoff_ms"] == 200
    assert patient["grpc.max_reconnect_backoff_ms"] == 1000


def test_metadata_and_merging() -> None:
    options = ConnectionOptions(api_key="s3cret", metadata=(("x-team", "infra"),))
    assert options.call_metadata() == (("authorization", "Bearer s3cret"), ("x-team", "infra"))
    assert ConnectionOptions().call_metadata() == ()
    merged = ConnectionOptions.merge(options, metadata=[("x-more", "1")])
    assert merged.call_metadata()[-1] == ("x-more", "1") and merged.api_key == "s3cret"
    assert ConnectionOptions.merge(None, api_key="k").api_key == "k"
    assert ConnectionOptions.merge(options, api_key="s3cret") == options
    with pytest.raises(ValueError, match="api_key is given twice"):
        ConnectionOptions.merge(options, api_key="other")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_message_bytes": 1000}, "max_message_bytes must be at least 1 MiB"),
        (
            {"keepalive_interval": 0.1},
            "keepalive_interval must be a number of seconds from 1 up to",
        ),
        ({"keepalive_timeout": 0}, "keepalive_timeout must be a number of seconds above 0 up to"),
        (
            {"reconnect_backoff_max": 0},
            "reconnect_backoff_max must be a number of seconds from 0.1 up to",
        ),
        ({"connect_timeout": 0.01}, "connect_timeout must be a number of seconds from 0.1 up to"),
        # gRPC takes each as an int32 of milliseconds: NaN, infinity and more are refused
        # here, not by gRPC when the channel is made.
        ({"connect_timeout": float("nan")}, "connect_timeout must be .* got nan"),
        ({"keepalive_interval": float("inf")}, "keepalive_interval must be .* got inf"),
        ({"keepalive_timeout": float("nan")}, "keepalive_timeout must be .* got nan"),
        (
            {"reconnect_backoff_max": 3e6},
            "reconnect_backoff_max must be .* up to 2147483.647; got 3000000.0",
        ),
        ({"metadata": (("k",),)}, "metadata must be"),
        ({"api_key": ""}, "api_key must be a non-empty single-line string"),
        ({"api_key": "a\nb"}, "api_key must be a non-empty single-line string"),
    ],
)
def test_bad_options_are_refused_where_they_are_made(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionOptions(**fields)


class _Watch(task_service_pb2_grpc.TaskServiceServicer):
    """WatchTask sends the task once, then stays silent, as for a long-running task."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def WatchTask(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        yield task_service_pb2.WatchTaskResponse(task=task_pb2.Task(id=request.id))
        await asyncio.Event().wait()


class _Proxy:
    """A TCP proxy that can freeze: the peer stays connected but nothing gets through,
    as when a host dies or a network partitions without closing the connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the other side hears nothing
                dst.write(data)
                await dst.drain()

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()


async def _watch_through_frozen_proxy(
    options: ConnectionOptions, wait: float
) -> Callable[[], None] | BaseException | None:
    servicer = _Watch()  # type: ignore[abstract]  # a fake: the other RPCs go unused
    # The coordinator must allow pings this often for keepalive to work (see the report).
    server = aio.server(options=[("grpc.http2.min_ping_interval_without_data_ms", 500)])
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = _Proxy(port)
    channel = options.open_channel(f"127.0.0.1:{await proxy.start()}")
    outcome: BaseException | None = None
    try:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        call = stub.WatchTask(
            task_service_pb2.WatchTaskRequest(id="t"), metadata=options.call_metadata()
        )
        first = await call.read()
        assert isinstance(first, task_service_pb2.WatchTaskResponse) and first.task.id == "t"
        assert servicer.metadata[0]["authorization"] == "Bearer k"
        proxy.frozen.set()
        try:
            async with asyncio.timeout(wait):
                await call.read()
        except (grpc.RpcError, TimeoutError) as exc:
            outcome = exc
        call.cancel()
    finally:
        await channel.close()
        await proxy.close()
        await server.stop(0)
    return outcome


async def test_keepalive_notices_a_dead_peer_on_a_quiet_stream() -> None:
    options = ConnectionOptions(api_key="k", keepalive_interval=1.0, keepalive_timeout=1.0)
    outcome = await _watch_through_frozen_proxy(options, wait=10)
    # The ping got no answer: the stream fails instead of waiting forever.
    assert isinstance(outcome, aio.AioRpcError), outcome
    assert outcome.code() is grpc.StatusCode.UNAVAILABLE


async def test_without_keepalive_a_dead_peer_goes_unnoticed() -> None:
    # The control: the same stream without pings is still waiting when the test stops it.
    options = ConnectionOptions(api_key="k", keepalive_interval=None)
    outcome = await _watch_through_frozen_proxy(options, wait=4)
    assert isinstance(outcome, TimeoutError), outcome


class _Tag:
    """Adds a header to every call, as a tracing interceptor would add its context."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.seen.append(method)
        metadata = aio.Metadata(*(details.metadata or ()), ("x-trace", "abc"))
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under its first kind only: one object per kind.
class _TagUnary(_Tag, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _TagStream(_Tag, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


async def test_interceptors_see_every_call_of_the_client() -> None:
    from conveyor.client import AsyncClient, TaskNotFoundError

    servicer = _Watch()  # type: ignore[abstract]  # a fake: the other RPCs go unused
    server = aio.server()
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: list[str] = []
    try:
        options = ConnectionOptions(interceptors=(_TagUnary(seen), _TagStream(seen)))
        async with AsyncClient(f"127.0.0.1:{port}", options=options, api_key="k") as client:
            updates = client.watch("t")
            assert (await anext(updates)).id == "t"
            await updates.aclose()
            # GetTask is not implemented by this servicer: the call still went through.
            with pytest.raises(RPCError) as caught:
                await client.get("t")
            assert not isinstance(caught.value, TaskNotFoundError)
    finally:
        await server.stop(0)
    assert seen == ["/conveyor.v1.TaskService/WatchTask", "/conveyor.v1.TaskService/GetTask"]
    assert servicer.metadata[0]["x-trace"] == "abc"
    assert servicer.metadata[0]["authorization"] == "Bearer k"
