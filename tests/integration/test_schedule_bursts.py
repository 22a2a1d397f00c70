"""The firer's bursts: a tick that many ALLOW schedules share is prepared by a task of its
own, ahead of the rounds, and committed at the tick; each tick still fires once per
schedule, beside schedules of another cadence fired by the rounds, and a firer stopped
while a burst waits for its tick leaves nothing of it behind."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import asyncpg
from testsupport import eventually, leader_pool, service_deps

from conveyor.coordinator.ids import uuid7
from conveyor.coordinator.schedules.cron import first_tick
from conveyor.coordinator.schedules.firer import ScheduleFirer
from conveyor.coordinator.schedules.validation import validate_schedule
from conveyor.coordinator.store import schedules
from conveyor.v1 import schedule_pb2 as spb


async def _insert(pool: asyncpg.Pool, prefix: str, cron: str, count: int) -> None:
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        msg = spb.Schedule(
            name=f"{prefix}-{i}", cron=cron, task_template=spb.TaskTemplate(type=prefix)
        )
        valid = validate_schedule(msg, tenant="default", max_payload_bytes=1024)
        rows.append(
            schedules.NewSchedule(
                uuid7(), valid.row, False, first_tick(valid.spec, now, valid.row.start_time)
            )
        )
    async with pool.acquire() as conn:
        await schedules.insert_many(conn, rows, now)


async def _locked(pool: asyncpg.Pool) -> bool:
    """Some schedules are locked (by a burst: nothing else runs)."""
    async with pool.acquire() as conn:
        free = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM schedules FOR UPDATE SKIP LOCKED) s"
        )
        total = await conn.fetchval("SELECT count(*) FROM schedules")
    return bool(free < total)


async def _ticks(pool: asyncpg.Pool, type_: str) -> dict[str, list[datetime]]:
    """Each schedule's fired ticks (from the idempotency keys), in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT idempotency_key, run_at FROM tasks WHERE type = $1 ORDER BY run_at", type_
        )
    out: dict[str, list[datetime]] = {}
    for r in rows:
        out.setdefault(r["idempotency_key"].split(":")[1], []).append(r["run_at"])
    return out


async def _run_bursts(
    pool: asyncpg.Pool, dsn: str, epoch: int, *, lookahead: float, bursts: int
) -> ScheduleFirer:
    """Runs a firer (bursts of 20 or more, prepared ``lookahead`` seconds ahead) until it
    has prepared ``bursts`` bursts; returns it stopped."""
    firer = ScheduleFirer(
        service_deps(pool, dsn, epoch=epoch),
        burst=20,
        max_burst_lookahead=lookahead,
        min_burst_lookahead=lookahead,
    )
    firer.start()
    try:
        await eventually(lambda: firer.bursts >= bursts, timeout=60, what=f"{bursts} bursts")
    finally:
        await firer.stop()
    return firer


async def test_a_shared_tick_is_prepared_as_a_burst_and_fires_once(database_dsn: str) -> None:
    pool, epoch = await leader_pool(database_dsn)
    try:
        # 40 schedules share every fifth second (a burst of 40 with burst=20); 5 fire
        # every second, through the rounds.
        await _insert(pool, "shared", "*/5 * * * * *", 40)
        await _insert(pool, "single", "* * * * * *", 5)
        # Each burst waits about 8 s for its tick: longer than the pool's
        # idle_in_transaction_session_timeout (5 s), which must not end it.
        await _run_bursts(pool, database_dsn, epoch, lookahead=8.0, bursts=2)
        shared = await _ticks(pool, "shared")
        single = await _ticks(pool, "single")
    finally:
        await pool.close()
    assert len(shared) == 40 and len(single) == 5
    # Every shared schedule fired the same ticks, each once, five seconds apart.
    first = next(iter(shared.values()))
    assert len(first) >= 2
    assert all(t.second % 5 == 0 for t in first)
    assert all(b - a == timedelta(seconds=5) for a, b in itertools.pairwise(first))
    assert all(ticks == first for ticks in shared.values()), "a tick fired twice or not at all"
    # The rounds fired the per-second schedules meanwhile, each tick once.
    for ticks in single.values():
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))


async def test_a_burst_stopped_before_its_tick_writes_nothing(database_dsn: str) -> None:
    pool, epoch = await leader_pool(database_dsn)
    try:
        firer = ScheduleFirer(
            service_deps(pool, database_dsn, epoch=epoch),
            burst=10,
            max_burst_lookahead=55.0,
            min_burst_lookahead=55.0,
        )
        # One tick 45 s from now (seconds first: "S M H * * *"), so that the burst starts
        # at once (it may start 55 s ahead) and waits for its tick, more than the two
        # waits below may take on a busy machine: it is stopped before it.
        tick = datetime.now(UTC) + timedelta(seconds=45)
        await _insert(pool, "minutely", f"{tick.second} {tick.minute} {tick.hour} * * *", 30)
        firer.start()
        await eventually(lambda: firer._bursts, timeout=15, what="a burst in flight")
        await eventually(lambda: _locked(pool), timeout=15, what="the burst's schedules locked")
        async with pool.acquire() as conn, conn.transaction():
            # The burst checks the epoch last: the leadership row is free meanwhile, so a
            # new leader could take office (NOWAIT raises if it is locked).
            await conn.execute("SELECT 1 FROM leadership FOR UPDATE NOWAIT")
        await firer.stop()
        async with pool.acquire() as conn:
            fired = await conn.fetchval("SELECT count(*) FROM tasks")
            cursors = await conn.fetch("SELECT next_fire_time, wake_time FROM schedules")
    finally:
        await pool.close()
    assert fired == 0, "a stopped burst committed firings"
    # The cursors are where they were: the next firer fires the tick.
    assert len({(r["next_fire_time"], r["wake_time"]) for r in cursors}) == 1


async def test_schedules_reaching_a_burst_tick_are_taken_by_id_and_fire_once(
    database_dsn: str,
) -> None:
    pool, epoch = await leader_pool(database_dsn)
    try:
        # The per-second schedules reach every fifth second while a burst holds the
        # shared ones: the rounds must not walk the burst's locks, and must fire them.
        await _insert(pool, "shared", "*/5 * * * * *", 40)
        await _insert(pool, "single", "* * * * * *", 30)
        firer = await _run_bursts(pool, database_dsn, epoch, lookahead=4.0, bursts=3)
        shared = await _ticks(pool, "shared")
        single = await _ticks(pool, "single")
    finally:
        await pool.close()
    assert firer.taken_by_id > 0, "no schedule was taken by id at a burst's tick"
    assert len(shared) == 40 and len(single) == 30
    first = next(iter(shared.values()))
    assert all(ticks == first for ticks in shared.values()), "a tick fired twice or not at all"
    for ticks in single.values():
        # Every second, each once, the burst's ticks included.
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
        assert any(t.second % 5 == 0 for t in ticks[1:])


async def test_the_next_tick_of_every_second_schedules_is_never_a_burst(
    database_dsn: str,
) -> None:
    pool, epoch = await leader_pool(database_dsn)
    firer = ScheduleFirer(
        service_deps(pool, database_dsn, epoch=epoch),
        burst=20,
        max_burst_lookahead=4.0,
        min_burst_lookahead=4.0,
    )
    try:
        # 30 schedules share the next second's tick (burst=20 would count it), and 40 a
        # tick 2-3 s ahead. A round woken early (a burst's start, a client) looks for
        # bursts before the next second is in its horizon: that tick is the rounds'. A
        # burst holding it left the rounds nothing to fire until its commit, and each
        # empty round shrank their lookahead, so the second after it was late.
        shared = datetime.now(UTC) + timedelta(seconds=3)
        await _insert(pool, "single", "* * * * * *", 30)
        await _insert(pool, "shared", f"{shared.second} * * * * *", 40)
        # After the inserts: the per-second schedules' first tick is then at most a
        # second ahead, whichever second they were made in.
        await firer._prepare_bursts(datetime.now(UTC))
        ticks = list(firer.burst_ticks)
    finally:
        await firer.stop()
        await pool.close()
    assert ticks == [shared.replace(microsecond=0)], f"bursts started for {ticks}"


async def test_a_round_that_finds_nothing_due_keeps_the_lookahead(database_dsn: str) -> None:
    pool, epoch = await leader_pool(database_dsn)
    firer = ScheduleFirer(service_deps(pool, database_dsn, epoch=epoch), max_lookahead=0.9)
    try:
        # A round woken early finds nothing due: it says nothing about how long a round
        # of work takes, so the lookahead (how early the next one starts) stays.
        await _insert(pool, "later", "0 0 0 1 1 *", 5)
        firer.lookahead = 0.6
        for _ in range(3):
            await firer.run_once()
    finally:
        await firer.stop()
        await pool.close()
    assert firer.lookahead == 0.6
