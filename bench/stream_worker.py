"""Simulated worker streams for ``conveyor bench-streams``: one process holding many.

``python -m conveyor.bench.stream_worker --coordinator ADDR --streams N --prefix P``

Each stream speaks the worker protocol as the SDK does (``worker/_session.py``), with
nothing behind it: Hello (a worker id of its own, the API key of ``CONVEYOR_API_KEY``,
one credit), then a Heartbeat every ``Welcome.heartbeat_interval`` listing the leases it
holds, and for each Assignment a Results message and one Credit back, as a worker of one
slot does once its handler returns. The ``probe`` task's payload is the submitter's
wall-clock send time; its result is the pickup latency in milliseconds (the same clock:
every process of the benchmark runs on one machine).

Protocol with the parent (``bench/streams.py``), one line each on stdout:

- ``READY``: imported and set up; the parent then writes ``GO`` on stdin, so every
  process starts its Hellos at once;
- ``CONNECTED {json}``: when every stream is welcomed, or the connect deadline passed:
  the first Hello and last Welcome (wall clock), how many were welcomed, the errors seen;
- then the streams run (heartbeats, assignments) until SIGTERM or stdin closes.

A failed stream is opened again after the SDK's reconnect backoff (0.1 s doubling to
2 s, jittered), until the connect deadline: the figure is how many are connected by
then. Each connection attempt is given ``--connect-attempt`` seconds (20, gRPC's own
default): with the SDK's default (no longer than the reconnect backoff, 0.2-1 s) a
coordinator accepting thousands of connections at once answers too late, and every
attempt fails and comes back. With ``--per-connection 1`` (the default) every stream has
its own channel, so its own TCP connection and HTTP/2 session, as separate worker
processes would; with K > 1, K streams share one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from conveyor.transport import ConnectionOptions
from conveyor.v1 import worker_service_pb2 as pb
from conveyor.v1 import worker_service_pb2_grpc as pb_grpc
from conveyor.worker._connection import RECONNECT_BACKOFF
from conveyor.worker._session import first_heartbeat_delay

QUEUE = "bench-streams"
TASK_TYPE = "probe"
WELCOME_TIMEOUT = 60.0
# Each process's, as a worker process learns them once (not a system call per Hello).
_HOSTNAME = socket.gethostname()
_PID = os.getpid()
FULL_COLLECTION_THRESHOLD = 10_000
"""Middle-generation collections between two full ones (Python's default: 10)."""


def raise_fd_limit() -> int:
    """Raises the soft limit of open files to the hard one (a stream is a socket each);
    returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@dataclass
class _Stats:
    first_hello: float | None = None
    last_welcome: float | None = None
    welcomed: int = 0
    streams: int = 0
    """Streams of this process: ``welcomed`` is set once each is."""
    errors: dict[str, int] = field(default_factory=dict)
    assignments: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class _Stream:
    """One simulated worker: its stream, its leases, its writes (one at a time)."""

    def __init__(self, worker_id: str, channel: grpc.aio.Channel, key: str | None) -> None:
        self.worker_id = worker_id
        self.channel = channel
        self.metadata = (("authorization", f"Bearer {key}"),) if key else None
        self.held: dict[str, pb.Lease] = {}
        self.finished = 0
        self.write_lock = asyncio.Lock()
        self.resume_token = b""
        self.welcomed = False

    async def write(
        self, call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        message: pb.ConnectRequest,
    ) -> None:  # fmt: skip
        async with self.write_lock:
            await call.write(message)

    async def run(self, stats: _Stats, deadline: float, welcomed: asyncio.Event) -> None:
        """Connects (again, until the deadline, when a stream fails), then serves it."""
        first = True
        failures = 0
        while True:
            call = pb_grpc.WorkerServiceStub(self.channel).Connect(metadata=self.metadata)
            try:
                hello = pb.Hello(
                    protocol_version=1, worker_id=self.worker_id, hostname=_HOSTNAME,
                    pid=_PID, queues=[QUEUE], task_types=[TASK_TYPE], credits=1,
                    resume_token=self.resume_token,
                    in_flight=list(self.held.values()),
                )  # fmt: skip
                sent = time.time()
                if stats.first_hello is None:
                    stats.first_hello = sent
                await call.write(pb.ConnectRequest(hello=hello))
                async with asyncio.timeout(WELCOME_TIMEOUT):
                    answer = await call.read()
                if (
                    not isinstance(answer, pb.ConnectResponse)
                    or answer.WhichOneof("message") != "welcome"
                ):
                    raise RuntimeError("no Welcome")
                welcome = answer.welcome
                self.resume_token = welcome.resume_token
                if first:
                    first = False
                    self.welcomed = True
                    stats.welcomed += 1
                    stats.last_welcome = time.time()
                    if stats.welcomed >= stats.streams:
                        welcomed.set()
                await self._serve(call, welcome, stats)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                if os.environ.get("CONVEYOR_BENCH_DEBUG") and sum(stats.errors.values()) < 3:
                    import traceback

                    traceback.print_exc()
                    print(exc.debug_error_string(), file=sys.stderr)
                stats.error(f"{'dropped' if not first else 'refused'} {exc.code().name}: "
                            f"{(exc.details() or '')[:200]}")  # fmt: skip
            except Exception as exc:  # a benchmark counts failures, it does not stop on one
                stats.error(f"{'dropped' if not first else 'refused'} {type(exc).__name__}")
            finally:
                call.cancel()
            if first and time.time() > deadline:
                return
            failures = failures + 1 if first else 1
            await asyncio.sleep(RECONNECT_BACKOFF.delay(failures))

    async def _serve(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        welcome: pb.Welcome,
        stats: _Stats,
    ) -> None:
        # The seconds, without protobuf's pure-Python ToTimedelta (4 % of a stream
        # process's samples while connecting).
        told = welcome.heartbeat_interval
        interval = (told.seconds + told.nanos / 1e9) or 10.0
        beats = asyncio.get_running_loop().create_task(self._heartbeats(call, interval))
        try:
            while True:
                message = await call.read()
                if not isinstance(message, pb.ConnectResponse):  # EOF
                    return
                kind = message.WhichOneof("message")
                if kind == "assignments":
                    await self._run(call, message.assignments.assignments, stats)
                elif kind == "redirect":
                    return
        finally:
            beats.cancel()

    async def _run(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        assignments: Sequence[pb.Assignment],
        stats: _Stats,
    ) -> None:
        picked = time.time()
        results = []
        for assignment in assignments:
            stats.assignments += 1
            self.held[assignment.lease.task_id] = assignment.lease
            try:
                took = f"{(picked - float(assignment.payload)) * 1000.0:.3f}".encode()
            except ValueError:
                took = b""
            results.append(
                pb.TaskResult(
                    lease=assignment.lease, outcome=pb.TASK_OUTCOME_SUCCEEDED, result=took
                )
            )
        await self.write(call, pb.ConnectRequest(results=pb.Results(results=results)))
        for result in results:
            self.held.pop(result.lease.task_id, None)
        self.finished += len(results)
        await self.write(call, pb.ConnectRequest(credit=pb.Credit(credits=len(results))))

    async def _heartbeats(
        self, call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        interval: float,
    ) -> None:  # fmt: skip
        # As the SDK's sessions do: a random phase, so streams that connected together do
        # not beat together.
        await asyncio.sleep(first_heartbeat_delay(interval))
        while True:
            finished, self.finished = self.finished, 0
            beat = pb.Heartbeat(
                leases=list(self.held.values()), in_flight=len(self.held),
                free_slots=1 - len(self.held), finished=finished,
            )  # fmt: skip
            await self.write(call, pb.ConnectRequest(heartbeat=beat))
            await asyncio.sleep(interval)


async def _main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    key = os.environ.get("CONVEYOR_API_KEY") or None
    # The SDK's channel settings (keepalive pings, message limits, reconnect backoff),
    # with a connect timeout a loaded coordinator can meet (``--connect-attempt``).
    options = ConnectionOptions(connect_timeout=args.connect_attempt or None)
    channels: list[grpc.aio.Channel] = []
    streams: list[_Stream] = []
    for i in range(args.streams):
        if i % args.per_connection == 0:
            # A local subchannel pool: otherwise gRPC shares one connection between every
            # channel of the process to the same address.
            channels.append(
                grpc.aio.insecure_channel(
                    args.coordinator,
                    options=[*options.channel_options(), ("grpc.use_local_subchannel_pool", 1)],
                )
            )
        streams.append(_Stream(f"{args.prefix}-{i}", channels[-1], key))
    # One process holds thousands of streams where a real worker holds one: Python's
    # full collections walk every stream's objects, about every time a quarter more are
    # made, so connecting 2,500 streams cost about 1 s of them (issue 19, fourth round).
    # The set-up is frozen out of collections and full ones are left for after the
    # benchmark, so the simulated side's CPU per connect is the protocol's, not an
    # artefact of one process standing in for thousands (a worker's heap is small).
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("READY", flush=True)
    if (await stdin.readline()).strip() != b"GO":
        return
    stats = _Stats(streams=len(streams))
    deadline = time.time() + args.connect_timeout
    # Set by the last Welcome: this loop is not woken by every one (a wake-up, a timer
    # and a future per stream were the harness's, not a worker's, CPU per connect).
    welcomed = asyncio.Event()
    tasks = [loop.create_task(s.run(stats, deadline, welcomed)) for s in streams]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.time())):
            await welcomed.wait()
    # Streams still trying at the deadline stop: the phases after it measure the streams
    # connected, not a connect storm's tail (attempts then waited up to a minute for
    # their Welcome, and their Hellos kept the coordinator busy during the probes).
    for stream, task in zip(streams, tasks, strict=True):
        if not stream.welcomed:
            task.cancel()
    report = {
        "first_hello": stats.first_hello,
        "last_welcome": stats.last_welcome,
        "welcomed": stats.welcomed,
        "errors": dict(stats.errors),
    }
    print("CONNECTED " + json.dumps(report), flush=True)
    await stdin.read()  # until the parent closes it (or the process is stopped)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print("DONE " + json.dumps({"assignments": stats.assignments}), flush=True)
    for channel in channels:
        await channel.close(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--connect-attempt", type=float, default=20.0)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
