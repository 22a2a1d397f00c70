"""``conveyor status``: the leader, its epoch, the replicas and the connected workers."""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc
from google.protobuf import json_format

from conveyor.cli import output
from conveyor.cli.errors import CLIError
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="cluster status: leader, epoch, replicas, workers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_status)


async def _ask(address: str, rpc_timeout: float) -> admin_service_pb2.GetClusterStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        return await stub.GetClusterStatus(
            admin_service_pb2.GetClusterStatusRequest(), timeout=rpc_timeout
        )


async def _fetch(
    addresses: list[str], rpc_timeout: float
) -> admin_service_pb2.GetClusterStatusResponse:
    errors: list[str] = []
    for address in addresses:
        try:
            status = await _ask(address, rpc_timeout)
        except grpc.aio.AioRpcError as err:
            errors.append(f"{address}: {err.code().name} {err.details()}")
            continue
        # Only the leader knows the workers: ask it when someone else answered.
        leader = status.leader.address
        if leader and not status.answered_by.leader and leader != address:
            try:
                return await _ask(leader, rpc_timeout)
            except grpc.aio.AioRpcError as err:
                errors.append(f"{leader} (leader): {err.code().name} {err.details()}")
        return status
    raise CLIError("no coordinator answered: " + "; ".join(errors))


def _status(args: argparse.Namespace) -> int:
    addresses = [a.strip() for a in args.coordinator.split(",") if a.strip()]
    status = asyncio.run(_fetch(addresses, args.rpc_timeout))
    if args.json:
        print(json.dumps(json_format.MessageToDict(status), indent=2))
        return 0
    leader = status.leader
    print(f"cluster:  {status.cluster} ({status.mode})")
    print(f"leader:   {leader.address} ({leader.node_id})" if leader.node_id else "leader:   none")
    print(f"epoch:    {status.epoch}")
    print("replicas:")
    print(
        output.table(
            ["  NODE", "ADDRESS", "ROLE"],
            [
                (f"  {r.node_id}", r.address, "leader" if r.leader else "follower")
                for r in status.replicas
            ],
        )
    )
    print(f"workers:  {len(status.workers)}")
    if status.workers:
        print(
            output.table(
                ["  WORKER", "HOST", "PID", "QUEUES", "CREDIT", "STATE"],
                [
                    (
                        f"  {w.worker_id}",
                        w.hostname,
                        w.pid,
                        ",".join(w.queues),
                        w.credit,
                        "draining" if w.draining else "active",
                    )
                    for w in status.workers
                ],
            )
        )
    return 0 if leader.node_id else 1
