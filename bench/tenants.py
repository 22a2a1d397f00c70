"""``conveyor bench-tenants``: does a tenant flooding past its limits slow another tenant?

A coordinator process that requires keys, two tenants with their own keys and a worker
process each. Tenant B submits probe tasks one at a time at a light steady rate and
measures each submit's latency (client clock around the call) and each task's pickup
latency (client send time to handler start, as ``conveyor bench`` does): first alone, then
while tenant A (``bench/flood.py``, its own process) submits batches as fast as it can past
its submit rate and backlog limits, refusals and all. B's p99 figures flooded are
compared with its figures alone; the target is at most 2x.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from asyncio.subprocess import PIPE, Process
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import field_mask_pb2

from conveyor.bench.runner import _free_port, _percentile, _postgres, _say, _stop, _wait_serving
from conveyor.bench.worker import QUEUE
from conveyor.client import AsyncClient
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, auth_pb2

FLOOD_WARM_UP = 1.0
"""Seconds the flood runs before B measures, to measure B under a steady flood."""


@dataclass(frozen=True)
class TenantsConfig:
    seconds: float = 10.0
    """Length of each of B's two measurements."""
    rate: float = 50.0
    """B's probe submits per second."""
    flood_rate: float = 1000.0
    """A's submit_rate limit (tasks/s)."""
    flood_burst: int = 1000
    flood_backlog: int = 20_000
    callers: int = 4
    """A's concurrent submit calls."""
    batch: int = 500
    """Tasks per A call."""
    backlog: int = 0
    """Tasks of A's waiting in the shared queue before B measures beside it (written
    straight into the table; A's max_backlog is raised to hold them and its flood)."""
    dsn: str | None = None


async def _set_up(address: str, admin_key: str, cfg: TenantsConfig) -> tuple[str, str]:
    """The keys of tenants A and B; A's limits set."""
    metadata = (("authorization", f"Bearer {admin_key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        keys = []
        for tenant in ("tenant-a", "tenant-b"):
            reply = await admin.CreateApiKey(
                admin_service_pb2.CreateApiKeyRequest(
                    tenant=tenant,
                    scopes=[auth_pb2.SCOPE_SUBMIT, auth_pb2.SCOPE_READ, auth_pb2.SCOPE_WORKER],
                ),
                metadata=metadata,
            )
            keys.append(reply.secret)
        limits = auth_pb2.TenantLimits(
            submit_rate=cfg.flood_rate,
            submit_burst=cfg.flood_burst,
            max_backlog=cfg.flood_backlog + cfg.backlog,
        )
        await admin.UpdateTenantLimits(
            admin_service_pb2.UpdateTenantLimitsRequest(
                tenant="tenant-a",
                limits=limits,
                update_mask=field_mask_pb2.FieldMask(
                    paths=["submit_rate", "submit_burst", "max_backlog"]
                ),
            ),
            metadata=metadata,
        )
    return keys[0], keys[1]


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process used so far, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _probe(
    cfg: TenantsConfig, client: AsyncClient, db: asyncpg.Connection, coordinator: int
) -> dict[str, float]:
    """B's submits at ``cfg.rate`` for ``cfg.seconds``: submit and pickup latencies, and
    the share of a core the coordinator used meanwhile."""
    count = max(1, int(cfg.rate * cfg.seconds))
    cpu_before, wall_before = _cpu_seconds(coordinator), time.monotonic()
    interval = 1.0 / cfg.rate
    submits: list[float] = []
    ids: list[str] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
        sent = time.perf_counter()
        task = await client.submit("probe", repr(time.time()).encode(), queue=QUEUE, raw=True)
        submits.append((time.perf_counter() - sent) * 1000)
        ids.append(task.id)

    await asyncio.gather(*(one(i) for i in range(count)))
    cpu = (_cpu_seconds(coordinator) - cpu_before) / (time.monotonic() - wall_before)
    deadline = time.monotonic() + 120
    while True:
        rows = await db.fetch(
            "SELECT result FROM tasks WHERE id = ANY($1::uuid[]) AND state = 4", ids
        )
        if len(rows) == len(ids):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {len(ids)} probes finished within 120s")
        await asyncio.sleep(0.1)
    pickups = [float(r["result"]) for r in rows]
    return {
        "submit_p50_ms": round(statistics.median(submits), 2),
        "submit_p99_ms": round(_percentile(submits, 99), 2),
        "pickup_p50_ms": round(statistics.median(pickups), 2),
        "pickup_p99_ms": round(_percentile(pickups, 99), 2),
        "samples": len(ids),
        "coordinator_cpu": round(cpu, 2),
    }


async def run(cfg: TenantsConfig) -> dict[str, Any]:
    procs: list[Process] = []
    async with _postgres(cfg.dsn) as dsn:
        address = f"127.0.0.1:{_free_port()}"
        admin_key = api_keys.generate()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_BOOTSTRAP_KEY": admin_key}
        cli = [sys.executable, "-m", "conveyor.cli.main", "--log-level", "warning"]
        try:
            _say(f"starting the coordinator on {address} …")
            coordinator = await asyncio.create_subprocess_exec(
                *cli, "coordinator", "--dsn", dsn, "--listen", address, env=env
            )
            procs.append(coordinator)
            await _wait_serving(address, coordinator)
            a_key, b_key = await _set_up(address, admin_key, cfg)
            _say("starting a worker process per tenant …")
            worker = [sys.executable, "-m", "conveyor.bench.worker", "--coordinator", address]
            for key in (a_key, b_key):
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *worker, "--concurrency", "200", env={**env, "CONVEYOR_API_KEY": key}
                    )
                )
            db = await asyncpg.connect(dsn)
            try:
                async with AsyncClient(address, timeout=60.0, api_key=b_key) as client:
                    warm = await client.submit("probe", b"0", queue=QUEUE, raw=True)
                    await client.wait(warm.id, timeout=60)
                    _say(f"tenant B alone: {cfg.rate:g} submits/s for {cfg.seconds:g}s …")
                    alone = await _probe(cfg, client, db, coordinator.pid)
                    phases: dict[str, tuple[dict[str, float], dict[str, int]]] = {}
                    for mode in ("polite", "flood"):
                        if cfg.backlog:
                            _say(f"tenant A: a backlog of {cfg.backlog} tasks …")
                            await _seed_backlog(db, cfg.backlog)
                        _say(
                            f"tenant B while tenant A {FLOOD_MODES[mode]} ({cfg.callers} "
                            f"callers, batches of {cfg.batch}, limit {cfg.flood_rate:g}/s) …"
                        )
                        flood_env = {**env, "CONVEYOR_API_KEY": a_key}
                        phases[mode] = await _beside(
                            cfg, client, db, coordinator.pid, address, mode, flood_env
                        )
            finally:
                await db.close()
        finally:
            await _stop(procs)
    figures = _figures(cfg, alone, phases)
    _report(figures)
    return figures


async def _seed_backlog(db: asyncpg.Connection, count: int) -> None:
    """Tops tenant A's ready tasks in B's queue up to ``count``, in one statement (a submit
    of them would take as long as the measurement)."""
    await db.execute(
        """
        WITH have AS (
            SELECT count(*) AS n FROM tasks WHERE tenant = 'tenant-a' AND state = 1
        )
        INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state, priority,
            max_attempts, run_at, timeout_ms, retry_initial_ms, retry_max_ms,
            retry_multiplier, retry_jitter, labels, traceparent, create_time, update_time)
        SELECT gen_random_uuid(), 'tenant-a', $1, 'noop', '', 'application/octet-stream', 1,
            0, 3, now(), 60000, 1000, 60000, 2, 0, '{}', '', now(), now()
        FROM have, generate_series(1, $2 - have.n)
        """,
        QUEUE,
        count,
    )


FLOOD_MODES = {
    "polite": "submits at its limits (waiting as RetryInfo says)",
    "flood": "floods past its limits (ignoring RetryInfo)",
}


async def _beside(
    cfg: TenantsConfig,
    client: AsyncClient,
    db: asyncpg.Connection,
    coordinator: int,
    address: str,
    mode: str,
    env: dict[str, str],
) -> tuple[dict[str, float], dict[str, int]]:
    """B's figures while tenant A runs (``bench/flood.py``) in ``mode``; and A's tally."""
    args = ["--coordinator", address, "--seconds", str(cfg.seconds + FLOOD_WARM_UP + 1)]
    args += ["--batch", str(cfg.batch), "--callers", str(cfg.callers)]
    if mode == "polite":
        args.append("--polite")
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor.bench.flood", *args, env=env, stdout=PIPE
    )
    try:
        # A warm-up, not a wait for a condition: A runs from its start; B measures a steady A.
        await asyncio.sleep(FLOOD_WARM_UP)
        figures = await _probe(cfg, client, db, coordinator)
        out, _ = await asyncio.wait_for(flood.communicate(), cfg.seconds + 60)
    finally:
        await _stop([flood])
    return figures, json.loads(out.decode().strip().splitlines()[-1])


def _figures(
    cfg: TenantsConfig,
    alone: dict[str, float],
    phases: dict[str, tuple[dict[str, float], dict[str, int]]],
) -> dict[str, Any]:
    seconds = cfg.seconds + FLOOD_WARM_UP + 1
    out: dict[str, Any] = {"b_alone": alone}
    for mode, (figures, tally) in phases.items():
        out[f"b_beside_{mode}"] = {
            **figures,
            "submit_p99_ratio": round(figures["submit_p99_ms"] / alone["submit_p99_ms"], 2),
            "pickup_p99_ratio": round(figures["pickup_p99_ms"] / alone["pickup_p99_ms"], 2),
        }
        out[f"a_{mode}"] = {
            "calls_per_s": round(tally["calls"] / seconds),
            "refused_calls": tally["refused"],
            "accepted_per_s": round(tally["accepted_tasks"] / seconds),
        }
    flooded = out["b_beside_flood"]
    out["within_2x"] = flooded["submit_p99_ratio"] <= 2.0 and flooded["pickup_p99_ratio"] <= 2.0
    out["a_limit_per_s"] = cfg.flood_rate
    out["a_backlog"] = cfg.backlog
    return out


def _report(f: dict[str, Any]) -> None:
    def line(name: str, b: dict[str, float]) -> str:
        ratios = (
            f"   (p99 x{b['submit_p99_ratio']} / x{b['pickup_p99_ratio']})"
            if "submit_p99_ratio" in b
            else ""
        )
        return (
            f"  {name:<22} submit {b['submit_p50_ms']} / {b['submit_p99_ms']} ms   pickup "
            f"{b['pickup_p50_ms']} / {b['pickup_p99_ms']} ms   coordinator "
            f"{b['coordinator_cpu']:.0%} of a core{ratios}"
        )

    lines = [
        "",
        "Tenant fairness: tenant B's latencies (p50 / p99) alone and beside tenant A",
        line("B alone", f["b_alone"]),
    ]
    for mode in ("polite", "flood"):
        a = f[f"a_{mode}"]
        lines.append(line(f"B beside A ({mode})", f[f"b_beside_{mode}"]))
        lines.append(
            f"  {'':<22} A: {a['calls_per_s']} calls/s, {a['refused_calls']} refused, "
            f"{a['accepted_per_s']} tasks/s accepted (limit {f['a_limit_per_s']:g}/s)"
        )
    lines.append(f"  within 2x (flooded)    {'yes' if f['within_2x'] else 'NO'}")
    _say("\n".join(lines) + "\n")
