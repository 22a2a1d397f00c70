"""``conveyor worker --autoscale MIN:MAX``: the supervisor's command-line side.

The supervision itself is ``conveyor.worker._autoscale``; here the worker command's line
becomes the worker processes' command (the same line: each process sees
``CONVEYOR_AUTOSCALE_CHILD`` and runs as a plain worker), and the load is read from the
coordinators through KEDA's external scaler API with the command's API key and TLS (a
worker key may read its queues' depth), counting only the task types the worker module
registers: a backlog of a type none of these processes would take starts none.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass

import grpc

from conveyor.cli.app import Globals
from conveyor.worker._autoscale import CHILD_ENV, Load, ScalePolicy, Supervisor, parse_range

__all__ = ["CHILD_ENV", "Autoscale", "LoadReader", "parse_range", "run"]

# KEDA's names for the two metrics (coordinator/api/keda_scaler.py).
_BACKLOG = "conveyor-backlog"
_AGE = "conveyor-oldest-pending-age"


@dataclass(frozen=True)
class Autoscale:
    """The ``--autoscale*`` flags."""

    minimum: int
    maximum: int
    interval: float
    cooldown: float
    latency: float


class LoadReader:
    """Reads the supervised queues' load from the coordinators (the first that answers)."""

    def __init__(self, g: Globals, queues: tuple[str, ...], types: tuple[str, ...]) -> None:
        self._options = g.options()
        self._addresses = g.addresses
        self._timeout = g.rpc_timeout
        self._queues = ",".join(queues)
        self._types = ",".join(types)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def read(self) -> Load:
        from conveyor.keda import externalscaler_pb2 as pb
        from conveyor.keda import externalscaler_pb2_grpc as pb_grpc

        last: grpc.RpcError | None = None
        for address in self._addresses:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._options.open_channel(address)
            try:
                stub = pb_grpc.ExternalScalerStub(channel)
                values = {}
                for metric, name in (("backlog", _BACKLOG), ("oldestPendingAge", _AGE)):
                    ref = pb.ScaledObjectRef(
                        name="conveyor-worker-autoscale",
                        scalerMetadata={
                            "queue": self._queues,
                            "type": self._types,
                            "metric": metric,
                        },
                    )
                    reply = await stub.GetMetrics(
                        pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name),
                        metadata=self._options.call_metadata(),
                        timeout=self._timeout,
                    )
                    values[name] = reply.metricValues[0].metricValueFloat
                return Load(values[_BACKLOG], values[_AGE])
            except grpc.RpcError as exc:  # try the next coordinator
                last = exc
        raise RuntimeError(f"no coordinator answered: {last}")


def run(
    g: Globals,
    flags: Autoscale,
    *,
    concurrency: int,
    queues: tuple[str, ...],
    types: tuple[str, ...],
) -> int:
    """Runs the supervisor until SIGTERM or SIGINT (module docstring), sized by the load
    of ``types`` in ``queues``; returns 0."""
    policy = ScalePolicy(
        flags.minimum, flags.maximum, concurrency, latency=flags.latency, cooldown=flags.cooldown
    )
    command = [sys.executable, "-m", "conveyor.cli.main", *sys.argv[1:]]
    reader = LoadReader(g, queues, types)

    async def main() -> None:
        stop, force = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await Supervisor(command, policy, reader.read, interval=flags.interval).run(stop, force)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await reader.close()

    asyncio.run(main())
    return 0
