"""The scenario harness (tests/support/cluster.py) end to end, in single-node mode: a
coordinator process and a worker process, a load, the checker against the real database.
The replicated scenarios run on the same pieces with ``etcd_endpoints`` given."""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg
from cluster import Checker, CoordinatorProcess, LoadGenerator, WorkerProcess, read_effects


async def test_load_through_processes_checks_clean_and_planted_faults_are_caught(
    database_dsn: str, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.log"
    coordinator = CoordinatorProcess(database_dsn, None, log_dir=tmp_path, name="coordinator")
    worker = WorkerProcess(coordinator.address, effects, log_dir=tmp_path, concurrency=50)
    try:
        coordinator.start()
        await coordinator.wait_serving()
        worker.start()

        # Frozen, it answers nothing; thawed, it serves again.
        coordinator.pause()
        assert coordinator.paused and await coordinator.health(timeout=0.3) is None
        coordinator.resume()
        await coordinator.wait_serving(timeout=10)

        load = LoadGenerator(coordinator.address, count=200, rate=400)
        load.start()
        await load.wait_acknowledged(50, timeout=20)
        log = await load.wait(timeout=60)
        assert len(log.acknowledged) == 200 and not log.failed

        checker = Checker(log, effects)
        report = await checker.report(database_dsn, wait_settled=60)
        assert report.violations == [], "\n".join(report.violations)
        assert report.succeeded == 200
        assert len(read_effects(effects)) >= 200

        # Plant faults in the real rows: the checker's SQL must see them.
        lost_id = log.acknowledged[log.key(0)]
        conn = await asyncpg.connect(database_dsn)
        try:
            await conn.execute("DELETE FROM tasks WHERE id = $1::uuid", lost_id)
            await conn.execute(
                """
                INSERT INTO tasks (id, tenant, queue, type, payload, content_type, state,
                    priority, max_attempts, idempotency_key, run_at, timeout_ms,
                    retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter,
                    create_time, update_time)
                SELECT gen_random_uuid(), tenant, queue, type, payload, content_type, 1,
                    priority, max_attempts, $2, run_at, timeout_ms, retry_initial_ms,
                    retry_max_ms, retry_multiplier, retry_jitter, now(), now()
                FROM tasks WHERE idempotency_key = $1
                """,
                log.key(1),
                log.key(999),
            )
        finally:
            await conn.close()
        violations = await checker.check(database_dsn)
        assert [v.split(":", 1)[0] for v in violations] == ["lost", "unacknowledged extra"]
        assert lost_id in violations[0]

        assert await worker.stop() == 0
        code = await coordinator.stop()
        assert code is not None and code in (0, -signal.SIGTERM)
    finally:
        worker.close()
        coordinator.close()
