"""``conveyor bench-floor``: a pickup's hops with nothing of Conveyor in them.

A pickup in ``conveyor bench`` is a client's unary call to the coordinator, one commit,
and a message on a worker's open bidirectional stream. This benchmark makes the same hops
between three processes over loopback gRPC, with grpc.aio at both ends as Conveyor has
it, and nothing else: raw bytes for messages (no protobuf), no interceptors, no
authentication, no store; with ``--commit`` the relay commits one row to a durable
PostgreSQL before passing the message on, as the coordinator's hand-off does. The relay
queues the message for a send loop of the worker's stream, as the coordinator's outbox
does, and answers the client after.

Its latency (the client's send to the worker's read, both on the wall clock) is the floor
under Conveyor's pickup on the same machine: what the pickup measures above it is
Conveyor's own work; what it measures here no change to Conveyor's code can take away
short of another transport.

With ``--stream`` the client sends its probes on one open bidirectional stream instead of
a unary call each, and the relay answers each on it: the floor of an API that took
submits on a stream, as workers take assignments (Conveyor has no such method).

Roles: the parent process is the client and starts the relay and the worker as
``python -m conveyor.bench.floor relay|worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import struct
import sys
import time
from asyncio.subprocess import PIPE, Process
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import grpc.aio

from conveyor.bench import cpu
from conveyor.bench.runner import _free_port, _percentile, _postgres, _say, pickup_figures

SERVICE = "floor.Relay"
_SUBMIT = f"/{SERVICE}/Submit"
_SUBMIT_STREAM = f"/{SERVICE}/SubmitStream"
_CONNECT = f"/{SERVICE}/Connect"
_END = f"/{SERVICE}/End"
_PROBE = struct.Struct("<dI")
"""A probe's message: the client's wall-clock send time and its number."""
DELIVERED = b"\x01"
"""The relay's answer when a worker's stream took the probe (b"" when none is attached)."""
OUTBOX_SIZE = 1024
STARTUP_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0
WARM_UP = 50
TABLE = "conveyor_bench_floor"
"""The relay's table with ``--commit``, made for the run and dropped after it."""


@dataclass(frozen=True)
class FloorConfig:
    rate: float = 100.0
    seconds: float = 10.0
    commit: bool = False
    stream: bool = False
    dsn: str | None = None


# -- the relay (the coordinator's place) --------------------------------------------------


async def _relay(port: int, dsn: str | None) -> None:
    outbox: asyncio.Queue[bytes | None] = asyncio.Queue(OUTBOX_SIZE)
    attached = asyncio.Event()
    pool: asyncpg.Pool | None = None
    if dsn is not None:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)

    async def submit(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if pool is not None:
            # One statement outside a transaction block: one commit, one WAL flush.
            await pool.execute(f"INSERT INTO {TABLE} (probe) VALUES ($1)", request)
        if not attached.is_set():
            return b""
        await outbox.put(request)
        return DELIVERED

    async def submit_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        # One probe at a time, answered in order: probes come 10-20 ms apart.
        async for request in requests:
            await context.write(await submit(request, context))

    async def connect(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        attached.set()
        while (message := await outbox.get()) is not None:
            await context.write(message)

    async def end(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await outbox.put(None)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Submit": grpc.unary_unary_rpc_method_handler(submit),
                    "SubmitStream": grpc.stream_stream_rpc_method_handler(submit_stream),
                    "Connect": grpc.stream_stream_rpc_method_handler(connect),
                    "End": grpc.unary_unary_rpc_method_handler(end),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        if pool is not None:
            await pool.close()


# -- the worker ---------------------------------------------------------------------------


async def _worker(port: int) -> None:
    """Reads probes until the relay ends the stream, then prints each one's latency (ms)
    as one JSON list, warm-up probes (number 0) left out."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        connect: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(_CONNECT)
        call = connect()
        await call.write(b"hello")
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                break
            read = time.time()
            assert isinstance(message, bytes)
            sent, number = _PROBE.unpack(message)
            if number:
                latencies.append((read - sent) * 1000.0)
    print(json.dumps(latencies), flush=True)


# -- the client (the parent) ----------------------------------------------------------------

Submit = Callable[[bytes], Awaitable[bytes]]


def _unary(channel: grpc.aio.Channel) -> Submit:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_SUBMIT)

    async def submit(probe: bytes) -> bytes:
        return await call(probe, timeout=CALL_TIMEOUT)

    return submit


@asynccontextmanager
async def _on_a_stream(channel: grpc.aio.Channel) -> AsyncIterator[Submit]:
    """Submits on one open stream: answers come in the order of the probes."""
    opened: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(_SUBMIT_STREAM)
    call = opened()
    waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
    writes = asyncio.Lock()

    async def read() -> None:
        while (answer := await call.read()) is not grpc.aio.EOF:
            assert isinstance(answer, bytes)
            waiting.popleft().set_result(answer)

    async def submit(probe: bytes) -> bytes:
        answer = asyncio.get_running_loop().create_future()
        async with writes:
            waiting.append(answer)
            await call.write(probe)
        return await asyncio.wait_for(answer, CALL_TIMEOUT)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        yield submit
    finally:
        reader.cancel()
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _spawn(role: str, port: int, *extra: str) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor.bench.floor", role, str(port), *extra, stdout=PIPE
    )


async def run(cfg: FloorConfig) -> dict[str, Any]:
    """Runs the relay and the worker, sends ``rate * seconds`` probes; the figures."""
    if not cfg.commit:
        return await _probe(cfg, None)
    async with _postgres(cfg.dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            # A logged table: a commit that touched only a temporary one would not wait
            # for the WAL flush, which is the point.
            await conn.execute(
                f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, probe bytea NOT NULL)"
            )
            try:
                return await _probe(cfg, dsn)
            finally:
                await conn.execute(f"DROP TABLE {TABLE}")
        finally:
            await conn.close()


async def _probe(cfg: FloorConfig, dsn: str | None) -> dict[str, Any]:
    port = _free_port()
    relay = await _spawn("relay", port, *([dsn] if dsn else []))
    procs = [relay]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT)
            worker = await _spawn("worker", port)
            procs.append(worker)
            submit = _unary(channel)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            # Until the worker's stream is attached, then a warm-up (first calls pay for
            # connections, plans and code paths once).
            while await submit(_PROBE.pack(time.time(), 0)) != DELIVERED:
                if time.monotonic() > deadline:
                    raise RuntimeError("the floor's worker did not attach in time")
                await asyncio.sleep(0.05)
            async with contextlib.AsyncExitStack() as stack:
                if cfg.stream:
                    submit = await stack.enter_async_context(_on_a_stream(channel))
                for _ in range(WARM_UP):
                    await submit(_PROBE.pack(time.time(), 0))
                    await asyncio.sleep(0.01)
                per_probe, answered = await _measure(cfg, submit, relay.pid, worker.pid, dsn)

            end: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_END)
            await end(b"", timeout=CALL_TIMEOUT)
            out, _ = await asyncio.wait_for(worker.communicate(), CALL_TIMEOUT)
        latencies: list[float] = json.loads(out)
        count = len(answered)
        if len(latencies) != count:
            raise RuntimeError(f"the worker read {len(latencies)} probes of {count}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    # The relay stands in for the coordinator in the CPU groups.
    per_probe["relay"] = per_probe.pop("coordinator")
    return {
        "rate": cfg.rate,
        "commit": dsn is not None,
        "stream": cfg.stream,
        **pickup_figures(latencies),
        "answer_p50_ms": round(statistics.median(answered), 2),
        "answer_p99_ms": round(_percentile(answered, 99), 2),
        "cpu_per_probe_us": per_probe,
    }


async def _measure(
    cfg: FloorConfig, submit: Submit, relay: int, worker: int, dsn: str | None
) -> tuple[dict[str, float], list[float]]:
    """Sends the probes at the configured rate: CPU per probe by process, and each probe's
    time to its answer (ms)."""
    postmaster = None
    if dsn is not None:
        conn = await asyncpg.connect(dsn)
        try:
            postmaster = cpu.postmaster_of(await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()
    groups = cpu.ProcessGroups(coordinator=relay, workers=[worker], postmaster=postmaster)
    count = max(1, int(cfg.rate * cfg.seconds))
    how = " on a stream" if cfg.stream else ""
    _say(f"floor: {count} probes{how} at {cfg.rate:g}/s{' with a commit' if dsn else ''} …")
    interval = 1.0 / cfg.rate
    answered: list[float] = []
    before = cpu.sample(groups.resolve())
    start = time.perf_counter()

    async def one(number: int) -> None:
        await asyncio.sleep(max(0.0, start + number * interval - time.perf_counter()))
        sent = time.perf_counter()
        await submit(_PROBE.pack(time.time(), number))
        answered.append((time.perf_counter() - sent) * 1000.0)

    await asyncio.gather(*(one(n) for n in range(1, count + 1)))
    return cpu.per_task_us(before, cpu.sample(groups.resolve()), count), answered


def report(f: dict[str, Any]) -> None:
    """The figures, for a reader."""
    print(
        f"floor {'with' if f['commit'] else 'without'} a commit, {f['pickup_samples']} probes"
        f"{' on a stream' if f['stream'] else ''} "
        f"at {f['rate']:g}/s\n"
        f"  pickup              p50 {f['pickup_p50_ms']} ms   p95 {f['pickup_p95_ms']} ms   "
        f"p99 {f['pickup_p99_ms']} ms   max {f['pickup_max_ms']} ms\n"
        f"  pickup histogram    "
        + "  ".join(f"{k}: {v}" for k, v in f["pickup_histogram_ms"].items())
        + f"\n  answer              p50 {f['answer_p50_ms']} ms   p99 {f['answer_p99_ms']} ms\n"
        "  CPU per probe       "
        + "  ".join(f"{k} {v:g} µs" for k, v in f["cpu_per_probe_us"].items()),
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m conveyor.bench.floor")
    parser.add_argument("role", choices=("relay", "worker"))
    parser.add_argument("port", type=int)
    parser.add_argument("dsn", nargs="?")
    args = parser.parse_args()
    if args.role == "relay":
        asyncio.run(_relay(args.port, args.dsn))
    else:
        asyncio.run(_worker(args.port))


if __name__ == "__main__":
    main()
