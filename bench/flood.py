"""The flooding tenant of ``conveyor bench-tenants``, as its own process:
``python -m conveyor.bench.flood --coordinator ADDR --seconds S`` (key in CONVEYOR_API_KEY).

It sends SubmitTasks calls of no-op tasks from several concurrent callers as fast as it can,
ignoring its quota refusals (no backoff: it keeps pushing past its limits), and prints one
JSON line of what happened. With ``--polite`` it waits as each refusal's RetryInfo says
instead: a tenant at its limits, not past them. The request is built and serialized once:
the flood costs its own machine as little as possible per call, so that what it costs the
coordinator is what is measured (on one machine, the flooding client's CPU is taken from
everyone else; in a deployment it runs elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import grpc

from conveyor.bench.worker import QUEUE
from conveyor.transport import parse_status
from conveyor.v1 import task_service_pb2

METHOD = "/conveyor.v1.TaskService/SubmitTasks"


async def flood(
    address: str, seconds: float, batch: int, callers: int, *, polite: bool = False
) -> dict[str, int]:
    tally = {"calls": 0, "refused": 0, "failed": 0, "accepted_tasks": 0}
    request = task_service_pb2.SubmitTasksRequest(
        tasks=[task_service_pb2.SubmitTaskRequest(type="noop", queue=QUEUE)] * batch
    ).SerializeToString()
    metadata = (("authorization", f"Bearer {os.environ['CONVEYOR_API_KEY']}"),)
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        submit: grpc.aio.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            METHOD,
            request_serializer=None,  # already bytes
            response_deserializer=task_service_pb2.SubmitTasksResponse.FromString,
        )

        async def caller() -> None:
            while time.monotonic() < deadline:
                tally["calls"] += 1
                try:
                    response = await submit(request, metadata=metadata, timeout=30)
                    tally["accepted_tasks"] += len(response.results)
                except grpc.aio.AioRpcError as err:
                    refused = err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    tally["refused" if refused else "failed"] += 1
                    wait = parse_status(err).retry_after
                    if polite and refused and wait:
                        await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(*(caller() for _ in range(callers)))
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--polite", action="store_true")
    args = parser.parse_args()
    tally = asyncio.run(
        flood(args.coordinator, args.seconds, args.batch, args.callers, polite=args.polite)
    )
    print(json.dumps(tally), flush=True)


if __name__ == "__main__":
    main()
