"""``conveyor status`` (leader, epoch, replicas, workers, evictions) and ``conveyor health``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Annotated

import grpc
import typer
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.cli import output, wire
from conveyor.cli.app import Globals, command
from conveyor.transport import error_from_rpc
from conveyor.v1 import admin_service_pb2

if TYPE_CHECKING:
    from conveyor.client import WorkerInfo


def register(app: typer.Typer) -> None:
    command(
        app,
        "status",
        example=[
            "conveyor status",
            "conveyor --coordinator 10.0.0.5:50051,10.0.0.6:50051 status",
        ],
    )(status)
    command(
        app,
        "health",
        example=[
            "conveyor health",
            "conveyor health --coordinator 127.0.0.1:50051 --rpc-timeout 3",
        ],
    )(health)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    *,
    g: Globals,
) -> int:
    """Show the leader, its epoch, the replicas, the workers and recent evictions.

    Each connected worker is listed with its queues, the task types it serves, the
    encryption keys it holds (it is given only tasks it can open), its tasks in flight and
    its state: active, draining, or unhealthy (its event loop lags, or its attempts fail
    where its peers' succeed: it is assigned nothing for now, and why is said below the
    table). A tenant's own key sees its tenant's workers only (the rest needs an admin key,
    which sees every tenant's). The exit code is 1 while the cluster has no leader.
    """
    from conveyor.client import PermissionDeniedError

    try:
        reply = asyncio.run(wire.cluster_status(g))
    except PermissionDeniedError:
        with g.client() as client:
            workers = client.workers()
        if as_json:
            rows = [dataclasses.asdict(w) for w in workers]
            output.print_text(json.dumps({"workers": rows}, indent=2, default=str))
        else:
            output.print_text("cluster:  (the leader, replicas and evictions need an admin key)")
            print_workers(workers, tenants=False)
        return 0
    if as_json:
        output.print_text(json.dumps(json_format.MessageToDict(reply), indent=2))
    else:
        print_status(reply)
    return 0 if reply.leader.node_id else 1


def print_status(reply: admin_service_pb2.GetClusterStatusResponse) -> None:
    from conveyor.client import WorkerInfo

    leader = reply.leader
    output.print_text(f"cluster:  {reply.cluster} ({reply.mode})")
    output.print_text(
        f"leader:   {leader.address} ({leader.node_id})" if leader.node_id else "leader:   none"
    )
    output.print_text(f"epoch:    {reply.epoch}")
    output.print_text("replicas:")
    output.print_table(
        ["NODE", "ADDRESS", "ROLE"],
        [(r.node_id, r.address, "leader" if r.leader else "follower") for r in reply.replicas],
        indent=2,
    )
    print_workers([WorkerInfo.from_proto(w) for w in reply.workers], tenants=True)
    if reply.paused_queues:
        paused = ", ".join(f"{q.queue} (tenant {q.tenant})" for q in reply.paused_queues)
        output.print_text(f"paused queues: {paused}")
    if reply.recent_evictions:
        output.print_text("recent evictions:")
        output.print_table(
            ["WHEN", "WORKER", "HOST", "PID", "RELEASED", "WHY"],
            [
                (
                    output.when(e.time.ToDatetime(tzinfo=UTC)) if e.HasField("time") else "-",
                    e.worker_id,
                    e.hostname,
                    e.pid,
                    e.released,
                    e.reason,
                )
                for e in reply.recent_evictions
            ],
            indent=2,
        )


def print_workers(workers: Sequence[WorkerInfo], *, tenants: bool) -> None:
    """The workers table; with a TENANT column when they may be several tenants'."""
    output.print_text(f"workers:  {len(workers)}")
    if not workers:
        return
    columns = ["WORKER", "HOST", "PID", "QUEUES", "TASK TYPES", "KEYS", "IN FLIGHT", "CREDIT"]
    output.print_table(
        [*(["TENANT"] if tenants else []), *columns, "STATE"],
        [
            (
                *([w.tenant] if tenants else []),
                w.worker_id,
                w.hostname,
                w.pid,
                ",".join(w.queues),
                ",".join(w.task_types) or "-",
                _keys(w),
                w.in_flight,
                w.credit,
                _state(w),
            )
            for w in workers
        ],
        indent=2,
    )
    for w in workers:
        if w.unhealthy:
            output.print_text(f"  {w.worker_id} is assigned nothing for now: {w.unhealthy}")


def _state(worker: WorkerInfo) -> str:
    """``draining``, ``unhealthy`` (assigned nothing for now) or ``active``."""
    if worker.draining:
        return "draining"
    return "unhealthy" if worker.unhealthy else "active"


def _keys(worker: WorkerInfo) -> str:
    """The encryption keys a worker holds: ``-`` for none, ``any`` when it did not say."""
    if worker.encryption_keys is None:
        return "any"
    return ",".join(worker.encryption_keys) or "-"


def health(
    service: Annotated[
        str, typer.Option("--service", help="A service name to check; '' is the whole server.")
    ] = "",
    *,
    g: Globals,
) -> int:
    """Check the gRPC health of each coordinator; exit 0 when all are SERVING.

    For container health checks and probes: prints each address with its state (SERVING,
    NOT_SERVING, UNREACHABLE).
    """
    results = asyncio.run(_check_all(g, service))
    for address, state in results:
        output.print_text(f"{address} {state}")
    return 0 if all(state == "SERVING" for _, state in results) else 1


async def _check_all(g: Globals, service: str) -> list[tuple[str, str]]:
    return list(await asyncio.gather(*(_check(g, a, service) for a in g.addresses)))


async def _check(g: Globals, address: str, service: str) -> tuple[str, str]:
    # A probe of each address, not a call to the cluster: no failover, and no API key
    # (health answers without one).
    seconds = g.rpc_timeout
    async with g.options().open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = await stub.Check(request, timeout=seconds)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return address, "UNREACHABLE"
            if err.code() is grpc.StatusCode.NOT_FOUND:
                return address, "SERVICE_UNKNOWN"
            raise error_from_rpc(err, address=address) from None
    return address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
