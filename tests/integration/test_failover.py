"""Replicated coordinators against real etcd, as separate processes with real signals.

Each scenario runs a load of keyed submits and compares what the clients were told with
what the database holds (tests/support/cluster.py: Checker), and checks that no epoch
wrote after a newer one took office (fencing_violations).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import (
    Checker,
    CoordinatorProcess,
    LoadGenerator,
    WorkerProcess,
    fencing_violations,
    wait_for_leader,
)
from etcd_servers import EtcdCluster, EtcdServer
from testsupport import eventually, sleep_until

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

pytestmark = pytest.mark.slow


def _has_workers(address: str) -> Callable[[], Awaitable[bool]]:
    """A check: the coordinator at ``address`` leads and has a worker connected."""

    async def check() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                status = await admin_service_pb2_grpc.AdminServiceStub(channel).GetClusterStatus(
                    admin_service_pb2.GetClusterStatusRequest(), timeout=2
                )
            except grpc.aio.AioRpcError:
                return False
        return status.answered_by.leader and len(status.workers) > 0

    return check


class Cluster:
    """Coordinators and workers of one scenario; closes everything it started."""

    def __init__(self, dsn: str, etcd: list[str], log_dir: Path) -> None:
        self.dsn = dsn
        self.etcd = etcd
        self.log_dir = log_dir
        self.coordinators: list[CoordinatorProcess] = []
        self.workers: list[WorkerProcess] = []
        self.effects = log_dir / "effects.log"

    async def start_coordinators(self, count: int, **options: Any) -> None:
        for i in range(count):
            coordinator = CoordinatorProcess(
                self.dsn, self.etcd, log_dir=self.log_dir, name=f"c{i}", **options
            )
            self.coordinators.append(coordinator.start())
        for coordinator in self.coordinators:
            await coordinator.wait_serving()

    @property
    def addresses(self) -> str:
        return ",".join(c.address for c in self.coordinators)

    def start_workers(self, count: int, addresses: str | None = None, **options: Any) -> None:
        for _ in range(count):
            worker = WorkerProcess(
                addresses or self.addresses, self.effects, log_dir=self.log_dir, **options
            )
            self.workers.append(worker.start())

    def by_address(self, address: str) -> CoordinatorProcess:
        return next(c for c in self.coordinators if c.address == address)

    def close(self) -> None:
        for process in [*self.workers, *self.coordinators]:
            process.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(1500)}" for p in self.coordinators)


@pytest.fixture
async def cluster(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> AsyncIterator[Cluster]:
    scenario = Cluster(database_dsn, etcd_server.endpoints, tmp_path)
    try:
        yield scenario
    finally:
        scenario.close()


async def test_leader_sigkill_with_1000_tasks_in_flight(cluster: Cluster) -> None:
    await cluster.start_coordinators(3)
    first = await wait_for_leader(cluster.dsn)
    cluster.start_workers(2, concurrency=50)
    load = LoadGenerator(cluster.addresses, count=1000, rate=400)
    load.start()
    await load.wait_acknowledged(300)
    cluster.by_address(first["address"]).kill()
    second = await wait_for_leader(cluster.dsn, newer_than=first["epoch"], timeout=30)
    assert second["address"] != first["address"]
    log = await load.wait(timeout=120)
    violations = await Checker(log, cluster.effects).check(cluster.dsn, wait_settled=60)
    assert not violations, "\n".join(violations[:20]) + cluster.logs()
    assert not await fencing_violations(cluster.dsn)


async def _paused_leader_scenario(cluster: Cluster) -> tuple[list[str], list[str]]:
    """SIGSTOP the leader past its lease, let another take over, SIGCONT the old one.

    One worker may only talk to the old leader, so an old leader that still believed it
    led would have someone to dispatch to when it wakes.
    """
    await cluster.start_coordinators(2)
    first = await wait_for_leader(cluster.dsn)
    old = cluster.by_address(first["address"])
    cluster.start_workers(1, concurrency=20)
    cluster.start_workers(1, addresses=old.address, concurrency=20)
    # The load goes to the old leader alone, so it holds submits when it wakes (followers
    # take submits too, and a client given several addresses spreads them: a load that
    # reached the follower alone would leave the old leader nothing to try).
    load = LoadGenerator(old.address, count=600, rate=100)
    load.start()
    await load.wait_acknowledged(100)
    old.pause()
    second = await wait_for_leader(cluster.dsn, newer_than=first["epoch"], timeout=30)
    # The new leader has taken over a worker (the old one wakes up to a changed world).
    await eventually(_has_workers(second["address"]), timeout=30)
    old.resume()
    log = await load.wait(timeout=120)
    violations = await Checker(log, cluster.effects).check(cluster.dsn, wait_settled=30)
    return violations, await fencing_violations(cluster.dsn)


async def test_paused_leader_is_fenced_and_follows(cluster: Cluster) -> None:
    violations, fenced = await _paused_leader_scenario(cluster)
    assert not violations, "\n".join(violations[:20]) + cluster.logs()
    assert not fenced, "\n".join(fenced[:20])
    # The old leader knows it is a follower now, and where the leader is.
    leader = await wait_for_leader(cluster.dsn)
    old = next(c for c in cluster.coordinators if c.address != leader["address"])
    async with grpc.aio.insecure_channel(old.address) as channel:
        status = await admin_service_pb2_grpc.AdminServiceStub(channel).GetClusterStatus(
            admin_service_pb2.GetClusterStatusRequest(), timeout=5
        )
    assert not status.answered_by.leader
    assert status.leader.address == leader["address"]


async def test_checker_catches_a_paused_leader_without_fencing(
    database_dsn: str, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    scenario = Cluster(database_dsn, etcd_server.endpoints, tmp_path)
    try:
        await scenario.start_coordinators(2, env={"CONVEYOR_UNSAFE_DISABLE_FENCING": "1"})
        first = await wait_for_leader(scenario.dsn)
        old = scenario.by_address(first["address"])
        scenario.start_workers(1, concurrency=20)
        scenario.start_workers(1, addresses=old.address, concurrency=20)
        # The load goes to the old leader alone, as in _paused_leader_scenario: a load
        # that reached the follower left the old leader nothing to dispatch on resume (it
        # then noticed its lost term first, and this test saw no violation).
        load = LoadGenerator(old.address, count=600, rate=100)
        load.start()
        await load.wait_acknowledged(100)
        old.pause()
        second = await wait_for_leader(scenario.dsn, newer_than=first["epoch"], timeout=30)
        await eventually(_has_workers(second["address"]), timeout=30)
        old.resume()
        # The old leader, unfenced, dispatches again under its stale epoch.
        found = await eventually(lambda: fencing_violations(scenario.dsn), timeout=30)
        assert found
        await load.wait(timeout=120)
    finally:
        scenario.close()


async def test_one_etcd_member_down_keeps_serving(
    database_dsn: str, tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    scenario = Cluster(database_dsn, etcd_cluster.endpoints, tmp_path)
    try:
        await scenario.start_coordinators(2)
        first = await wait_for_leader(scenario.dsn)
        scenario.start_workers(1, concurrency=20)
        load = LoadGenerator(scenario.addresses, count=400, rate=100)
        load.start()
        await load.wait_acknowledged(50)
        await etcd_cluster[0].stop()
        log = await load.wait(timeout=120)
        violations = await Checker(log, scenario.effects).check(scenario.dsn, wait_settled=30)
        assert not violations, "\n".join(violations[:20]) + scenario.logs()
        # Nobody lost office over it (a member lost is not a quorum lost).
        assert (await wait_for_leader(scenario.dsn))["epoch"] >= first["epoch"]
    finally:
        scenario.close()


async def test_etcd_down_stops_dispatch_until_it_returns(
    cluster: Cluster, etcd_server: EtcdServer
) -> None:
    await cluster.start_coordinators(2)
    first = await wait_for_leader(cluster.dsn)
    cluster.start_workers(1, concurrency=20)
    load = LoadGenerator(cluster.addresses, count=300, rate=50, give_up_after=120)
    load.start()
    await load.wait_acknowledged(50)
    await etcd_server.stop()
    # Safe: with no etcd there is no leader, so nothing is dispatched.
    leader_log = cluster.by_address(first["address"])

    async def stepped_down() -> bool:
        tail = leader_log.log_tail(50_000)
        return "no longer leads" in tail or "steps down" in tail

    await eventually(stepped_down, timeout=15)
    await asyncio.to_thread(etcd_server.start)
    await wait_for_leader(cluster.dsn, newer_than=first["epoch"], timeout=30)
    log = await load.wait(timeout=180)
    violations = await Checker(log, cluster.effects).check(cluster.dsn, wait_settled=60)
    assert not violations, "\n".join(violations[:20]) + cluster.logs()
    assert not await fencing_violations(cluster.dsn)


async def test_rolling_restart_loses_nothing(cluster: Cluster) -> None:
    await cluster.start_coordinators(3)
    await wait_for_leader(cluster.dsn)
    cluster.start_workers(2, concurrency=30)
    load = LoadGenerator(cluster.addresses, count=800, rate=100, give_up_after=120)
    load.start()
    await load.wait_acknowledged(50)
    for coordinator in cluster.coordinators:
        await coordinator.restart()  # SIGTERM, then start again on the same port
        await coordinator.wait_serving()
    log = await load.wait(timeout=180)
    violations = await Checker(log, cluster.effects).check(cluster.dsn, wait_settled=60)
    assert not violations, "\n".join(violations[:20]) + cluster.logs()
    assert not await fencing_violations(cluster.dsn)


async def test_postgres_restart_under_load_loses_nothing(
    pg_tmpdir: Path, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    import asyncpg

    from conveyor.embedded import EmbeddedPostgres

    # Durable: a crash-like stop of a server with synchronous_commit off loses the last
    # commits by design, which the checker would (rightly) report as lost tasks.
    postgres = EmbeddedPostgres(pg_tmpdir / "pg", durable=True)
    base = await asyncio.to_thread(postgres.start)
    conn = await asyncpg.connect(base)
    await conn.execute("CREATE DATABASE scenario")
    await conn.close()
    dsn = postgres.dsn("scenario")
    scenario = Cluster(dsn, etcd_server.endpoints, tmp_path)
    try:
        # A 10 s etcd lease: the last assertion is about PostgreSQL's restart not moving the
        # leadership, and the default 2 s lease can lapse on its own when the machine is
        # starved (CI failed so once, at a load average of 8).
        await scenario.start_coordinators(2, election_ttl=10)
        first = await wait_for_leader(dsn)
        scenario.start_workers(1, concurrency=20)
        load = LoadGenerator(scenario.addresses, count=500, rate=100, give_up_after=120)
        load.start()
        await load.wait_acknowledged(100)
        # A crash-like stop (no shutdown checkpoint), then the same server back.
        await asyncio.to_thread(postgres.stop, "immediate")
        await asyncio.to_thread(postgres.start)
        log = await load.wait(timeout=180)
        violations = await Checker(log, scenario.effects).check(dsn, wait_settled=60)
        assert not violations, "\n".join(violations[:20]) + scenario.logs()
        assert not await fencing_violations(dsn)
        # The leader kept office through it: the election is etcd's, not PostgreSQL's.
        leader = await wait_for_leader(dsn)
        assert leader["epoch"] == first["epoch"], scenario.logs()
    finally:
        scenario.close()
        await asyncio.to_thread(postgres.stop, "immediate")


async def test_schedules_fire_each_tick_once_across_leader_sigkill(cluster: Cluster) -> None:
    """Second-level schedules with catch-up FIRE_ALL: every tick fires exactly once even
    though the leader is SIGKILLed around ticks and a follower takes over."""
    import asyncpg

    from conveyor.client import AsyncClient

    count = 100
    await cluster.start_coordinators(2)
    first = await wait_for_leader(cluster.dsn)
    async with AsyncClient(cluster.addresses.split(",")) as client:
        await asyncio.gather(
            *(
                client.create_schedule(
                    f"s-{i:03d}", "* * * * * *", "tick", b"", raw=True, catch_up_policy="fire_all"
                )
                for i in range(count)
            )
        )
    db = await asyncpg.connect(cluster.dsn)
    try:
        epoch = first["epoch"]
        for offset in (0.005, -0.01):
            leader = await wait_for_leader(cluster.dsn, newer_than=epoch - 1)
            boundary = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
            await sleep_until(boundary + timedelta(seconds=offset))
            victim = cluster.by_address(leader["address"])
            victim.kill()
            epoch = (await wait_for_leader(cluster.dsn, newer_than=leader["epoch"]))["epoch"]
            victim.start()
            await victim.wait_serving()

        end = datetime.now(UTC).replace(microsecond=0)

        async def fired_through_end() -> bool:
            behind: int = await db.fetchval(
                "SELECT count(*) FROM schedules WHERE next_fire_time <= $1", end
            )
            return behind == 0

        await eventually(fired_through_end, timeout=20)
        rows = await db.fetch(
            """
            SELECT split_part(idempotency_key, ':', 2) AS schedule_id, count(*) AS n,
                count(DISTINCT run_at) AS ticks, min(run_at) AS first, max(run_at) AS last
            FROM tasks WHERE run_at <= $1 GROUP BY 1
            """,
            end,
        )
        assert len(rows) == count
        for row in rows:
            span = int((row["last"] - row["first"]).total_seconds()) + 1
            # No tick twice, none missing (catch-up fired the ones during failover).
            assert row["n"] == row["ticks"] == span, dict(row)
            assert row["last"] == end
        assert not await fencing_violations(cluster.dsn)
    finally:
        await db.close()
