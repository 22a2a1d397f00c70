"""``conveyor coordinator``, ``conveyor worker`` and ``conveyor dev``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

from conveyor.cli.errors import CLIError
from conveyor.coordinator import Coordinator, CoordinatorConfig, serve
from conveyor.coordinator.election import parse_endpoints

DEFAULT_LISTEN = "127.0.0.1:50051"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev",
        help="run PostgreSQL (embedded), a coordinator and a demo worker on this machine",
    )
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    p.add_argument(
        "--data-dir", default=".conveyor/dev", metavar="DIR", help="where PostgreSQL keeps data"
    )
    p.add_argument("--concurrency", type=int, default=20, help="demo worker slots")
    p.set_defaults(run=_dev)

    p = sub.add_parser("coordinator", help="run a coordinator")
    p.add_argument(
        "--dsn",
        default=os.environ.get("CONVEYOR_DSN"),
        help="PostgreSQL connection string (env CONVEYOR_DSN)",
    )
    p.add_argument("--listen", default=os.environ.get("CONVEYOR_LISTEN", DEFAULT_LISTEN))
    p.add_argument(
        "--etcd",
        default=os.environ.get("CONVEYOR_ETCD", ""),
        metavar="URL[,URL]",
        help="etcd endpoints for leader election (env CONVEYOR_ETCD); none: single-node",
    )
    p.add_argument(
        "--advertise",
        default=os.environ.get("CONVEYOR_ADVERTISE", ""),
        metavar="HOST:PORT",
        help="address other processes reach this coordinator at (default: --listen)",
    )
    p.add_argument("--cluster", default="default", help="cluster name (one leader per cluster)")
    p.add_argument(
        "--election-ttl",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="etcd lease TTL: how long a dead leader keeps office",
    )
    p.add_argument("--lease-duration", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--max-payload-bytes", type=int, default=1 << 20)
    p.add_argument("--pool-size", type=int, default=16, help="most PostgreSQL connections")
    p.set_defaults(run=_coordinator)

    p = sub.add_parser("worker", help="run a worker process")
    p.add_argument(
        "target",
        nargs="?",
        help="MODULE[:ATTR] naming a conveyor.worker.Worker (ATTR defaults to 'worker')",
    )
    p.add_argument("--demo", action="store_true", help="serve the demo types echo, sleep, fail")
    p.add_argument("--concurrency", type=int, default=None, help="overrides the worker's own")
    p.add_argument("--queues", default=None, help="comma-separated; overrides the worker's own")
    p.set_defaults(run=_worker)


def _coordinator_config(args: argparse.Namespace) -> CoordinatorConfig:
    if not args.dsn:
        raise CLIError("no database: pass --dsn postgresql://... or set CONVEYOR_DSN", code=2)
    if args.lease_duration <= 0 or args.heartbeat_interval <= 0:
        raise CLIError("--lease-duration and --heartbeat-interval must be positive", code=2)
    if args.heartbeat_interval >= args.lease_duration:
        raise CLIError("--heartbeat-interval must be shorter than --lease-duration", code=2)
    try:
        etcd = tuple(parse_endpoints(args.etcd)) if args.etcd else ()
    except ValueError as exc:
        raise CLIError(f"--etcd: {exc}", code=2) from None
    if args.election_ttl < 1:
        raise CLIError("--election-ttl must be at least 1 second", code=2)
    return CoordinatorConfig(
        dsn=args.dsn,
        listen=args.listen,
        cluster=args.cluster,
        etcd=tuple(f"http://{host}:{port}" for host, port in etcd),
        advertise=args.advertise,
        election_ttl=args.election_ttl,
        lease_duration=args.lease_duration,
        heartbeat_interval=args.heartbeat_interval,
        max_payload_bytes=args.max_payload_bytes,
        pool_max_size=args.pool_size,
        pool_min_size=min(4, args.pool_size),
    )


def _coordinator(args: argparse.Namespace) -> int:
    asyncio.run(serve(_coordinator_config(args)))
    return 0


def _build_worker(args: argparse.Namespace) -> object:
    from conveyor.worker import Worker, load_worker
    from conveyor.worker.demo import register_demo_tasks

    overrides: dict[str, object] = {}
    if args.concurrency is not None:
        overrides["concurrency"] = args.concurrency
    if args.queues:
        overrides["queues"] = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    if args.demo:
        if args.target:
            raise CLIError("give either MODULE[:ATTR] or --demo, not both", code=2)
        worker = Worker(args.coordinator, **overrides)  # type: ignore[arg-type]
        register_demo_tasks(worker)
        return worker
    if not args.target:
        raise CLIError("name the worker to run (MODULE[:ATTR]) or pass --demo", code=2)
    try:
        worker = load_worker(args.target)
    except (ImportError, AttributeError, TypeError) as exc:
        raise CLIError(str(exc), code=2) from None
    worker.configure(coordinators=args.coordinator, **overrides)  # type: ignore[arg-type]
    return worker


def _worker(args: argparse.Namespace) -> int:
    worker = _build_worker(args)
    asyncio.run(worker.run())  # type: ignore[attr-defined]
    return 0


def _dev(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run_dev(args, data_dir))


async def _run_dev(args: argparse.Namespace, data_dir: Path) -> int:
    from conveyor.embedded.postgres import EmbeddedPostgres
    from conveyor.worker import Worker
    from conveyor.worker.demo import register_demo_tasks

    print(f"starting PostgreSQL in {data_dir / 'postgres'} …", flush=True)
    postgres = EmbeddedPostgres(data_dir / "postgres")
    dsn = await asyncio.to_thread(postgres.start)
    coordinator: Coordinator | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("starting the coordinator …", flush=True)
        coordinator = Coordinator(CoordinatorConfig(dsn=dsn, listen=args.listen))
        try:
            await coordinator.start()
        except OSError as exc:
            raise CLIError(f"{exc}; pick another with --listen HOST:PORT") from None
        worker = Worker(coordinator.address, concurrency=args.concurrency)
        register_demo_tasks(worker)
        worker_task = asyncio.create_task(worker.run(install_signal_handlers=False))
        print(_banner(coordinator.address, dsn), flush=True)
        await stop.wait()
        print("\nshutting down (worker, coordinator, PostgreSQL) …", flush=True)
        worker.shutdown()  # drains: running demo tasks get the grace period
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if coordinator is not None:
            await coordinator.stop()
        await asyncio.to_thread(postgres.stop)
    print("stopped.")
    return 0


def _banner(address: str, dsn: str) -> str:
    return f"""
Conveyor is running.
  coordinator  {address}   (gRPC; health and reflection on)
  postgres     {dsn}
  worker       demo task types: echo, sleep, fail

Submit a task with grpcurl:
  grpcurl -plaintext -d '{{"type": "echo", "payload": "ImhlbGxvIg=="}}' \\
      {address} conveyor.v1.TaskService/SubmitTask

or with the CLI / Python client:
  conveyor submit echo '"hello"' --wait --coordinator {address}
  python -c 'from conveyor.client import Client; c = Client("{address}"); \\
      t = c.submit("echo", "hello"); print(c.result(t.id, timeout=10))'

Press Ctrl-C to stop.
"""
