"""The leader's schedule firer: one loop fires every due schedule, in batches.

There is no timer per schedule. Each round locks a batch of due schedules (``wake_time``
<= now, by index, earliest first), decides what each fires (:func:`cron.plan`), inserts
every firing of the batch with one multi-row insert and moves every cursor with one
update, all in one transaction that first checks the leader's epoch. Then it wakes the
dispatcher for the queues that got work, and sleeps until the earliest ``wake_time``
(at most ``max_sleep``; :meth:`ScheduleFirer.wake` cuts the sleep short when a client
creates, changes or resumes a schedule).

Exactly once per tick: a firing's task has the idempotency key
``schedule:<schedule id>:<tick, UTC ISO 8601>`` and is inserted in the transaction that
moves the cursor past the tick. A crash before the commit leaves neither; after it, both.
A coordinator fenced off by a newer epoch fails its check and writes nothing, and the key
(ON CONFLICT DO NOTHING) turns any second insert of a tick into a no-op regardless.

Preparing ahead: a round's work for 10,000 second-level schedules takes a good part of a
second, so for ALLOW schedules (whose firing does not depend on the previous one) the
firer starts that early: it locks, plans and inserts in a transaction that then waits
for the tick and commits at it. The tasks become visible at their tick, not a round's
work after it; until then the rows stay locked, so a client changing such a schedule
waits for that commit (under a second). Every other policy is decided at the tick.

Bursts: a tick that many ALLOW schedules share (every per-minute schedule fires at second
0) is too much work for a round started within a second of it, so it is prepared by a
task of its own, seconds ahead, and committed at the tick (:meth:`ScheduleFirer._prepare_bursts`).

A firing is a submit: it counts against its tenant's ``max_backlog`` and ``submit_rate``
(``quotas.py``), decided once per tenant per batch, in memory. The ticks a tenant's limits
do not admit (the latest ones of the batch) submit nothing: each is recorded as refused,
with the limit, among the schedule's recent firings (``schedule_refusals``) and in
``conveyor_schedule_ticks_refused_total``, and the cursor moves past it as past a fired
tick; a refused tick is not fired later (the catch-up policy is about ticks missed while
no coordinator fired, and is unaffected).

One bad row never stops the firer, which serves every tenant: a schedule whose stored
values it cannot use (an expression or zone that does not compile, a template that does
not decode, tick arithmetic that fails) is set aside in the same transaction (``fault``
says why, ``wake_time`` NULL takes it out of the rounds), said once in the log and in
``conveyor_rows_set_aside_total``; the rest of the batch fires. UpdateSchedule and
ResumeSchedule bring it back.

Parsed expressions and templates are cached per schedule (keyed by its version), so a
round costs, per firing, a few microseconds of tick arithmetic and one row in each of
two statements. ``parallel`` batches run at once on their own connections (SKIP LOCKED
keeps them apart), so one batch's planning overlaps another's round trips.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf.message import DecodeError

from conveyor.coordinator.api.validation import NewTask
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.ids import raw_uuid7
from conveyor.coordinator.lifecycle.transitions import ID, Cause, Row
from conveyor.coordinator.schedules.cron import (
    OVERLAP_ALLOW,
    CronError,
    CronSpec,
    Plan,
    ScheduleState,
    compile_cron,
    plan,
    utc_now,
)
from conveyor.coordinator.schedules.validation import template_task
from conveyor.coordinator.store import leadership
from conveyor.coordinator.store import schedules as store
from conveyor.coordinator.store import tasks as task_store
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.tenancy.quotas import Quotas
from conveyor.transport._encryption import SCHEDULE_KEY_PREFIX

_log = logging.getLogger("conveyor.coordinator.schedules")

# Entries of the per-schedule cache beyond which it is dropped (deleted schedules linger).
_MAX_CACHED = 200_000
# The lookahead is this many times the last round's preparation time, plus the minimum.
_LOOKAHEAD_MARGIN = 1.5
_MIN_LOOKAHEAD = 0.05
# A burst (a tick many schedules share) starts this many times its estimated preparation
# ahead, plus the minimum (min_burst_lookahead: two rounds, since the rounds run about
# once a tick, so that no round takes a burst's tick before the burst starts); the
# estimate starts at this cost per firing and is measured.
_BURST_MARGIN = 2.0
_INITIAL_BURST_COST = 60e-6
# Longest wait of a burst for the rounds to be idle before its next batch.
_ROUNDS_IDLE_WAIT = 0.2
_BURST_IDLE_TIMEOUT = "SET LOCAL idle_in_transaction_session_timeout = '{:.0f}s'"
# Ticks up to this far ahead are the rounds' to fire, never a burst's.
_ROUNDS_REACH = timedelta(seconds=1)
# Seconds between looks for upcoming bursts (one grouped index range scan each).
_BURST_CHECK_INTERVAL = 0.5
# Refused ticks kept per schedule: as many as GetSchedule shows of its recent firings.
KEEP_REFUSALS = 10
# Seconds between log lines about one tenant's refused ticks.
REFUSALS_LOG_INTERVAL = 60.0
# What a stored schedule may hold that the firer cannot use; anything else is a bug.
_EXPECTED_FAULTS = (CronError, DecodeError, ValueError)


def idempotency_key(schedule_id: uuid.UUID, tick: datetime) -> str:
    """The key of a tick's task: ``schedule:<id>:<tick as UTC ISO 8601>``. Workers and
    clients read the schedule id from it (``transport._encryption.schedule_of``): an
    encrypted template is bound to it."""
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:{_iso(tick)}"


@functools.lru_cache(maxsize=4096)
def _iso(tick: datetime) -> str:
    # Cached: the schedules of a batch mostly share their tick, and strftime is slow.
    utc = tick.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return f"{utc:%Y-%m-%dT%H:%M:%S}{fraction}Z"


@dataclass(frozen=True)
class _Compiled:
    version: int
    spec: CronSpec
    task: NewTask
    values: tuple[Any, ...]
    """The task's values but the per-firing ones (``store.template_values``); equal
    templates share one tuple, so a batch sends each once."""
    key_prefix: str
    """The schedule's idempotency keys without the tick."""
    id_text: str
    """The schedule's id, as the store writes it."""


@dataclass(slots=True)
class _Firing:
    tenant: str
    schedule_id: uuid.UUID
    tick: datetime
    task_id: uuid.UUID | str
    """Text when made here (how it is written), a UUID when the tick's task existed."""
    template: _Compiled
    refused: str | None = None
    """The tenant limit that refused this firing (then it submits nothing)."""


class ScheduleFirer(Service):
    """Fires due schedules while this coordinator leads (a supervised service).

    Args:
        deps: The coordinator's services; the firer fences every firing transaction
            with the office's token, and is woken when a client changes a schedule.
        quotas: The tenants' limits, which every firing counts against; None fires
            without limits.
        now: The clock (an aware UTC datetime), injectable for tests.
        batch_size: Schedules locked and fired per statement (fewer while the schedules
            are behind and each fires several ticks: a batch's firings stay near this
            many); a transaction that prepares
            ahead may take several batches before it commits).
        parallel: Batches in flight at once, each on its own connection. Each batch
            after the first walks the rows the others hold (SKIP LOCKED): four cost
            PostgreSQL a fifth more per firing than two at 10,000 schedules, and did
            not fire sooner at 100,000 (docs/performance.md, issue 19, fourth round).
        max_sleep: Longest sleep between rounds, so schedules written by anything other
            than this coordinator's API are still noticed.
        misfire_grace: Ticks due more than this many seconds before the firer started are
            *missed* and follow the schedule's catch-up policy.
        buffer_recheck: How often a schedule with a buffered tick checks whether its
            previous firing has finished.
        max_lookahead: Seconds before a tick the firer may start preparing it (ALLOW
            schedules only); the round's preparation time, measured, sets how early it
            starts. Below 1 (ticks are whole seconds apart, so a round prepares at most
            one future tick); 0 turns preparing ahead off.
        burst: A tick that this many ALLOW schedules or more share (every per-minute
            schedule fires at second 0) is prepared on its own, earlier than a round's
            lookahead: see :meth:`_prepare_bursts`.
        max_burst_lookahead: Seconds before its tick a burst may start (the rows it
            locks stay locked until the tick); 0 turns burst preparation off.
        min_burst_lookahead: Seconds before its tick a burst starts at the least: two
            rounds, so that no round takes the tick first.
    """

    name = "schedule-firer"

    def __init__(
        self,
        deps: Deps,
        *,
        quotas: Quotas | None = None,
        now: Callable[[], datetime] = utc_now,
        batch_size: int = 1000,
        parallel: int = 2,
        max_sleep: float = 1.0,
        misfire_grace: float = 1.0,
        buffer_recheck: float = 0.5,
        max_lookahead: float = 0.9,
        burst: int = 5000,
        max_burst_lookahead: float = 30.0,
        min_burst_lookahead: float = 2.0,
    ) -> None:
        if batch_size < 1 or parallel < 1:
            raise ValueError("batch_size and parallel must be positive")
        if not 0 <= max_lookahead < 1:
            raise ValueError("max_lookahead must be at least 0 and below 1 second")
        if burst < 1 or not 0 <= min_burst_lookahead <= max_burst_lookahead:
            raise ValueError(
                "burst must be positive, and 0 <= min_burst_lookahead <= max_burst_lookahead"
            )
        super().__init__(deps)
        self.quotas = quotas
        self.now = now
        self.batch_size = batch_size
        self._round_rows = batch_size
        """Schedules the rounds lock per batch: batch_size over the ticks per schedule of
        the last batch. Behind by 20 s, 1,000 per-second schedules are 20,000 firings,
        whose planning on a starved machine outlasted the pool's 5 s
        idle_in_transaction_session_timeout: the transaction was killed, its work lost,
        and the firer further behind (seen at 100,000 schedules, docs/performance.md)."""
        self.parallel = parallel
        self.max_sleep = max_sleep
        self.misfire_grace = timedelta(seconds=misfire_grace)
        self.buffer_recheck = timedelta(seconds=buffer_recheck)
        self.max_lookahead = max_lookahead
        self.lookahead = min(max_lookahead, _MIN_LOOKAHEAD)
        """Current lookahead (seconds), adapted to how long preparing a round takes."""
        self._cache: dict[uuid.UUID, _Compiled] = {}
        self._templates: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        """Each distinct template's values, once (the cache's entries share them)."""
        self._prepared = 0.0
        self._prepared_firings = 0
        """Firings the round's transactions wrote (0: the round found nothing due)."""
        self.burst = burst
        self.max_burst_lookahead = max_burst_lookahead
        self.min_burst_lookahead = min_burst_lookahead
        self._bursts: dict[datetime, asyncio.Task[None]] = {}
        """The bursts being prepared, by tick; each commits at its tick."""
        self._arrivals: dict[datetime, list[str]] = {}
        """Per burst tick: the schedules (id text) the rounds moved to it since the burst
        started, which its transaction does not hold (see :meth:`_drain`)."""
        self._burst_cost = _INITIAL_BURST_COST
        """Seconds of preparation per firing of a burst, measured (wall clock, the
        rounds' share of the loop included)."""
        self._bursts_checked = -math.inf
        self._next_burst: datetime | None = None
        """When the next burst known to be coming should start (the loop wakes for it)."""
        self._near_preparing = 0
        self._near_idle = asyncio.Event()
        self._near_idle.set()
        self.bursts = 0
        """Bursts prepared ahead since start (for tests)."""
        self.burst_ticks: collections.deque[datetime] = collections.deque(maxlen=64)
        """The ticks of the latest bursts started (for tests)."""
        self.taken_by_id = 0
        """Schedules the rounds locked by id at a burst's tick (for tests)."""
        self.started: datetime | None = None
        self.fired = 0
        """Tasks submitted since start (for tests and metrics)."""
        self.refused = 0
        """Ticks the tenants' limits refused since start."""
        self._refusals_said: dict[tuple[str, str], tuple[float, int]] = {}
        """Per (tenant, limit): when its refused ticks were last logged, and how many have
        been refused since (they are logged at most once a REFUSALS_LOG_INTERVAL)."""

    @property
    def missed_before(self) -> datetime:
        """Ticks before this instant were missed: due well before the firer started."""
        started = self.started or self.now()
        return started - self.misfire_grace

    def start(self) -> None:
        """Starts the loop; call after taking office."""
        if not self.running:
            self.started = self.now()
        super().start()

    async def step(self) -> float:
        return await self.run_once()

    async def run_once(self) -> float:
        """Fires every schedule due now; returns how long to sleep before the next round.

        ALLOW schedules due within the lookahead are prepared now (inserted in a
        transaction that waits) and committed at their tick, so their tasks become
        visible on time even when a round's work takes a good part of a second. The other
        policies decide on the state of the previous firing, so they wait for the tick.
        """
        if self.quotas is not None:
            # Firings count in the backlog: fire against a count, not an empty one.
            await self.quotas.backlog_ready()
        now = self.now()
        horizon = now + timedelta(seconds=self.lookahead)
        self._reap_bursts()
        await self._prepare_bursts(now)
        self._prepared = 0.0
        self._prepared_firings = 0
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.parallel):
                    group.create_task(self._drain(now, horizon))
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        if self.max_lookahead > 0 and self._prepared_firings:
            # Start the next round early enough for this round's amount of work. A round
            # that fired nothing (woken early: by a client, or for a burst's start) says
            # nothing about that: each used to take a fifth off the lookahead, and a few
            # of them in one second left the next round too little time (docs/performance.md,
            # issue 19, sixth round).
            wanted = _LOOKAHEAD_MARGIN * self._prepared + _MIN_LOOKAHEAD
            self.lookahead = min(self.max_lookahead, max(wanted, 0.8 * self.lookahead))
        async with self.deps.db.read() as conn:
            allow, other = await store.next_wake(conn)
        wakes = [w for w in (other, allow and allow - timedelta(seconds=self.lookahead)) if w]
        if self._next_burst is not None:
            wakes.append(self._next_burst)
        if not wakes:
            return self.max_sleep
        # Rows a client's transaction had locked are due but were skipped: look again soon.
        return max(0.005, min(self.max_sleep, (min(wakes) - self.now()).total_seconds()))

    async def _drain(self, now: datetime, horizon: datetime) -> None:
        """Fires batches until fewer than a full batch of unlocked schedules is due.

        Batches whose ticks are still ahead pile up in one transaction, which commits at
        the latest of their ticks; the others commit as soon as they are written.
        """
        started = time.monotonic()
        self._near_preparing += 1
        self._near_idle.clear()
        preparing = True

        def prepared(firings: int = 0) -> None:
            nonlocal preparing
            self._prepared = max(self._prepared, time.monotonic() - started)
            self._prepared_firings += firings
            if preparing:
                # Bursts prepare while the rounds do not (they wait for their ticks).
                preparing = False
                self._near_preparing -= 1
                if not self._near_preparing:
                    self._near_idle.set()

        held = self._held_tick(horizon)
        arrived = self._arrivals.get(held, []) if held is not None else []

        async def fetch(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
            if held is None:
                return await store.due(conn, now, horizon, limit)
            # A burst's transaction holds most of the schedules due at its tick until
            # then: the index scan would try each of those row locks, batch after batch
            # (a second of PostgreSQL's CPU at 90,000, docs/performance.md). So the scan
            # ends before that tick, and the schedules the rounds themselves moved to it
            # are taken by primary key. Any other schedule due at it (made or resumed
            # while the burst prepared) waits for the burst's commit, then fires.
            rows: list[asyncpg.Record] = []
            while arrived and len(rows) < limit:
                take = arrived[-(limit - len(rows)) :]
                del arrived[-len(take) :]
                taken = await store.due_by_ids(conn, take, now, horizon)
                self.taken_by_id += len(taken)
                rows += taken
            if len(rows) < limit:
                rows += await store.due(conn, now, horizon, limit - len(rows), before=held)
            return rows

        try:
            more = True
            while more:
                more, _ = await self._transaction(
                    fetch, now, horizon, prepared=prepared, adaptive=True
                )
        finally:
            prepared()

    def _held_tick(self, horizon: datetime) -> datetime | None:
        """The earliest tick up to ``horizon`` whose burst has not committed yet."""
        held = [t for t, task in self._bursts.items() if t <= horizon and not task.done()]
        return min(held, default=None)

    async def _transaction(
        self,
        fetch: Callable[[asyncpg.Connection, int], Awaitable[list[asyncpg.Record]]],
        now: datetime,
        horizon: datetime,
        *,
        prepared: Callable[[int], None] | None = None,
        before_batch: Callable[[], Awaitable[object]] | None = None,
        fence_last: bool = False,
        adaptive: bool = False,
    ) -> tuple[bool, int]:
        """Fires the schedules ``fetch`` locks, batch after batch, in one transaction;
        returns whether the last batch was full (more may be due) and the firings.

        Batches whose ticks are still ahead pile up, and the transaction commits at the
        latest of their ticks (``prepared`` is called before that wait, with the firings
        written); one whose ticks
        have come commits as soon as it is written.

        ``fence_last`` checks the leader's epoch as the last statement instead of the
        first: a burst's transaction lasts seconds, and the check share-locks the
        leadership row until the commit, which would keep a new leader from taking
        office that long. Checked last, it is as safe (a stale epoch rolls everything
        back; once it passes, no new epoch can commit before this transaction does).

        ``adaptive`` (the rounds) locks fewer schedules per batch while they fire several
        ticks each (see ``_round_rows``); otherwise every batch is ``batch_size``.
        """
        firings: list[_Firing] = []
        inserted: list[Row] = []
        refused: list[_Firing] = []
        admitted: collections.Counter[str] = collections.Counter()
        more = True
        fence = self.deps.office.fence()
        try:
            async with self.deps.db.write(None if fence_last else fence) as conn:
                if fence_last:
                    # The pool's 5 s idle_in_transaction_session_timeout is there for the
                    # leadership row a frozen process would hold (store/db.py); this
                    # transaction does not hold it, and waits seconds for its tick (on a
                    # starved loop, also between its statements).
                    await conn.execute(_BURST_IDLE_TIMEOUT.format(self.max_burst_lookahead + 30))
                target: datetime | None = None
                while more:
                    if before_batch is not None:
                        await before_batch()
                    limit = self._round_rows if adaptive else self.batch_size
                    rows = await fetch(conn, limit)
                    more = len(rows) == limit
                    if not rows:
                        break
                    fired = await self._fire(conn, rows, now, horizon, admitted, refused, inserted)
                    if adaptive:
                        per_row = max(1.0, len(fired) / len(rows))
                        self._round_rows = max(1, round(self.batch_size / per_row))
                    firings += fired
                    if fired:
                        latest = max(f.tick for f in fired)
                        target = latest if target is None or latest > target else target
                    if target is None or target <= self.now():
                        break
                if prepared is not None:
                    prepared(len(firings))
                if target is not None:
                    await self._sleep_until(target)
                if fence_last:
                    await leadership.check_epoch(conn, fence)
        finally:
            if self.quotas is not None:
                for tenant, count in admitted.items():
                    self.quotas.done(tenant, count)
        self._count_refused(refused)
        self._announce(firings, inserted)
        return more, len(firings)

    # -- bursts ------------------------------------------------------------------------

    async def _prepare_bursts(self, now: datetime) -> None:
        """Starts preparing the ticks many ALLOW schedules share, each on its own.

        Every per-minute schedule fires at second 0: 90,000 of them are 90,000 firings
        at one tick, several seconds of preparation, which a round started within a
        second of the tick cannot do in time. Unlike a per-second schedule (whose row
        is the cursor, so its next tick can only be prepared once the previous one
        committed), a per-minute schedule's next tick is known for a minute. So a tick
        shared by ``burst`` schedules or more is prepared by a task of its own, started
        as early as its size needs (its firings times the measured cost per firing,
        with a margin; at most ``max_burst_lookahead``): it locks the schedules whose
        ``wake_time`` is that tick, inserts their firings batch by batch while the
        rounds are idle (they keep their priority: their ticks come first), and commits
        at the tick, as a round's prepared transaction does. What it has not locked by
        then (schedules that reached the tick later) the rounds fire as usual.

        Its transaction checks the leader's epoch last (``fence_last``), so it does not
        hold the leadership row while it waits; it holds its schedules' rows, so a
        client changing one of them waits for the tick (at most max_burst_lookahead), and
        so would a new leader's firer for those schedules if this process froze (up to
        the transaction's own idle timeout, max_burst_lookahead + 30 s: then they fire
        late, once).
        """
        if not self.max_burst_lookahead or self.max_lookahead <= 0:
            return
        moment = time.monotonic()
        if moment - self._bursts_checked < _BURST_CHECK_INTERVAL:
            return
        self._bursts_checked = moment
        until = now + timedelta(seconds=self.max_burst_lookahead)
        # Ticks within a second are the rounds' (their lookahead is under a second, so
        # this is past any round's horizon, and they run at least once a second): above
        # all the next tick of every-second schedules, which 10,000 of them share. Looked
        # for from the round's horizon, that tick, when a round was woken before it was
        # in the horizon (to start a burst), went to a burst; the burst held those
        # schedules, the rounds found nothing due until it committed and shrank their
        # lookahead on every empty look, and the second after was late.
        async with self.deps.db.read() as conn:
            upcoming = await store.upcoming_ticks(conn, now + _ROUNDS_REACH, until, self.burst)
        self._next_burst = None
        for tick, count in upcoming:
            if tick in self._bursts:
                continue
            lead = min(
                self.max_burst_lookahead,
                _BURST_MARGIN * count * self._burst_cost + self.min_burst_lookahead,
            )
            if (tick - now).total_seconds() > lead:
                begin = tick - timedelta(seconds=lead)
                if self._next_burst is None or begin < self._next_burst:
                    self._next_burst = begin
                continue
            self._arrivals[tick] = []
            self.burst_ticks.append(tick)
            self._bursts[tick] = asyncio.create_task(
                self._burst(tick, count), name=f"{self.name}-burst"
            )

    async def _burst(self, tick: datetime, expected: int) -> None:
        """Fires the ALLOW schedules due at ``tick``, prepared now, committed at it."""
        started = time.monotonic()
        fired = 0
        more = True
        while more:
            more, count = await self._transaction(
                lambda conn, limit: store.due_at(conn, tick, limit),
                self.now(),
                tick,
                prepared=functools.partial(self._burst_prepared, started, fired),
                before_batch=self._rounds_idle,
                fence_last=True,
            )
            fired += count
        self.bursts += 1
        _log.debug("burst of %d firings (%d expected) at %s", fired, expected, tick)

    async def _rounds_idle(self) -> None:
        """Returns when no round is preparing (or after a few seconds regardless: a burst
        must not starve either)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._near_idle.wait(), _ROUNDS_IDLE_WAIT)

    def _burst_prepared(self, started: float, before: int, firings: int) -> None:
        """A burst's transaction is written: its cost per firing updates the estimate."""
        fired = before + firings
        if fired >= self.burst:
            cost = (time.monotonic() - started) / fired
            self._burst_cost = 0.5 * self._burst_cost + 0.5 * cost

    def _reap_bursts(self) -> None:
        """Forgets the bursts that are done; a failed one fails this step (so a fenced
        firer stops, a store error backs off), after its tick: the rounds fire what it
        did not."""
        for tick, task in list(self._bursts.items()):
            if task.done():
                del self._bursts[tick]
                self._arrivals.pop(tick, None)
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]

    async def stop(self) -> None:
        await super().stop()
        bursts = list(self._bursts.values())
        self._bursts.clear()
        self._arrivals.clear()
        for task in bursts:
            task.cancel()
        await asyncio.gather(*bursts, return_exceptions=True)

    async def _sleep_until(self, moment: datetime) -> None:
        """Returns at ``moment`` by the firer's clock, not before (timers may fire early)."""
        for _ in range(10):
            wait = (moment - self.now()).total_seconds()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _fire(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[asyncpg.Record],
        now: datetime,
        horizon: datetime,
        admitted: collections.Counter[str],
        refused: list[_Firing],
        inserted: list[Row],
    ) -> list[_Firing]:
        """Fires one batch; returns the firings written. ``admitted`` counts the firings
        each tenant's limits admitted (to give back to the backlog after the commit),
        ``refused`` gets those they refused, ``inserted`` the new tasks' transitions."""
        faults = await self._compile(conn, rows)
        missed_before = self.missed_before
        firings: list[_Firing] = []
        planned: list[tuple[str, Plan, list[_Firing]]] = []
        missed = 0
        cache = self._cache
        # plan() is pure: schedules of one expression in the same state (a batch of
        # per-second schedules all at the same cursor) get the same Plan, computed once.
        # Its lists are only read.
        plans: dict[tuple[Any, ...], Plan] = {}
        for row in rows:
            schedule_id = row[_ID]
            if schedule_id in faults:
                continue
            compiled = cache[schedule_id]
            state = (compiled.spec, *(row[i] for i in _STATE))
            decided = plans.get(state)
            if decided is None:
                try:
                    decided = plan(
                        compiled.spec,
                        ScheduleState(*state[1:]),
                        horizon if state[2] == OVERLAP_ALLOW else now,
                        missed_before,
                    )
                except Exception as exc:  # one schedule's arithmetic never stops the others
                    faults[schedule_id] = _fault(row, exc, "its ticks could not be computed")
                    continue
                plans[state] = decided
            missed += decided.missed
            tenant = row[_TENANT]
            mine = [
                _Firing(tenant, schedule_id, tick, str(raw_uuid7()), compiled)
                for tick in decided.fire
            ]
            firings.extend(mine)
            planned.append((compiled.id_text, decided, mine))
        if missed:
            _log.info("%d schedules had missed ticks; their catch-up policies applied", missed)
        if faults:
            await store.set_aside(conn, faults)
            self.deps.metrics.count_set_aside(self.name, len(faults))
        if firings and self.quotas is not None:
            refusals = self._admit(firings, admitted)
            if refusals:
                refused += refusals
                firings = [f for f in firings if f.refused is None]
                await store.record_refusals(
                    conn,
                    [
                        store.Refusal(f.schedule_id, f.tenant, f.tick, f.refused or "")
                        for f in refusals
                    ],
                    now,
                    KEEP_REFUSALS,
                )
        if firings:
            # Written at the tick when prepared ahead (the commit waits for it).
            inserted += await self._insert(conn, firings, max(now, *(f.tick for f in firings)))
        recheck = now + self.buffer_recheck
        advances = [_advance(r, d, mine, recheck) for r, d, mine in planned]
        await store.advance(conn, advances)
        if self._arrivals:
            for moved in advances:
                arrived = self._arrivals.get(moved.wake_time)  # type: ignore[arg-type]
                if arrived is not None:
                    arrived.append(str(moved.id))
        return firings

    def _admit(self, firings: list[_Firing], admitted: collections.Counter[str]) -> list[_Firing]:
        """Asks each tenant's limits once for this batch's firings (oldest ticks first);
        marks and returns those refused."""
        assert self.quotas is not None
        if not self.quotas.limits_firings():
            return []
        by_tenant: dict[str, list[_Firing]] = {}
        for firing in firings:
            by_tenant.setdefault(firing.tenant, []).append(firing)
        refused: list[_Firing] = []
        for tenant, mine in by_tenant.items():
            count, limit = self.quotas.admit_firings(tenant, len(mine))
            admitted[tenant] += count
            if limit is None:
                continue
            mine.sort(key=_tick)
            for firing in mine[count:]:
                firing.refused = limit
                refused.append(firing)
        return refused

    def _count_refused(self, refused: list[_Firing]) -> None:
        """After the commit: the refused ticks in the metrics, and in the log (a tenant
        over its limit for hours is one line a REFUSALS_LOG_INTERVAL, not one a tick)."""
        if not refused:
            return
        self.refused += len(refused)
        tally = collections.Counter((f.tenant, f.refused or "") for f in refused)
        self.deps.metrics.count_refused_ticks(tally)
        now = time.monotonic()
        for (tenant, limit), count in tally.items():
            said, since = self._refusals_said.get((tenant, limit), (-math.inf, 0))
            if now - said < REFUSALS_LOG_INTERVAL:
                self._refusals_said[(tenant, limit)] = (said, since + count)
                continue
            self._refusals_said[(tenant, limit)] = (now, 0)
            _log.warning(
                "%d schedule ticks of tenant %r refused: it is over its %s (a firing is a "
                "submit; the ticks are recorded among their schedules' recent firings)",
                since + count,
                tenant,
                limit,
            )

    async def _insert(
        self, conn: asyncpg.Connection, firings: list[_Firing], now: datetime
    ) -> list[Row]:
        """Inserts the firings' tasks; a firing whose key is taken gets the existing task.
        Returns the transitions of the tasks inserted.

        Only the per-firing values (id, key, tick, which template) are built per firing;
        each distinct template of the batch is sent once and joined in SQL (building a
        whole task row per firing was a third of the firer's CPU at 100,000 schedules).
        """
        numbers: dict[int, str] = {}
        templates: list[tuple[Any, ...]] = []
        ids: list[str] = []
        keys: list[str] = []
        ticks: list[str] = []
        which: list[str] = []
        for f in firings:
            values = f.template.values
            number = numbers.get(id(values))
            if number is None:
                templates.append(values)
                number = numbers[id(values)] = str(len(templates))
            tick = _iso(f.tick)
            ids.append(str(f.task_id))
            keys.append(f.template.key_prefix + tick)
            ticks.append(tick)
            which.append(number)
        inserted = await store.insert_firings(conn, templates, ids, keys, ticks, which, now)
        if len(inserted) == len(firings):
            return inserted
        # Only a client submitting with a key of this format, or a writer that escaped
        # fencing, can have taken one.
        by_key = {(f.tenant, key): f for f, key in zip(firings, keys, strict=True)}
        written = {row[ID] for row in inserted}
        taken = [k for k, f in by_key.items() if str(f.task_id) not in written]
        existing = await task_store.find_by_idempotency_keys(conn, taken)
        for k in taken:
            if k in existing:
                by_key[k].task_id = existing[k]["id"]
        _log.warning("%d schedule ticks had tasks already; not fired again", len(taken))
        return inserted

    async def _compile(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]
    ) -> dict[uuid.UUID, str]:
        """Caches the expressions and templates of ``rows``; returns the schedules it could
        not use, with the reason (each said once in the log)."""
        faults: dict[uuid.UUID, str] = {}
        stale = [
            r["id"]
            for r in rows
            if (c := self._cache.get(r["id"])) is None or c.version != r["version"]
        ]
        if not stale:
            return faults
        if len(self._cache) + len(stale) > _MAX_CACHED:
            self._cache.clear()
            self._templates.clear()
            stale = [r["id"] for r in rows]
        by_id = {r["id"]: r for r in rows}
        # A new leader compiles every schedule once; many share their template (bytes), so
        # each distinct one is decoded and validated once per call, not once per schedule.
        decoded: dict[tuple[str, bytes], tuple[NewTask, tuple[Any, ...]]] = {}
        for t in await store.templates(conn, stale):
            row = by_id[t["id"]]
            tenant = row["tenant"]
            try:
                known = decoded.get((tenant, t["template"]))
                if known is None:
                    task = template_task(t["template"])
                    values = store.template_values(tenant, task)
                    known = decoded[(tenant, t["template"])] = (
                        task,
                        self._templates.setdefault(values, values),
                    )
                spec = compile_cron(row["cron"], row["time_zone"])
            except Exception as exc:  # one schedule's stored values never stop the others
                self._cache.pop(t["id"], None)
                faults[t["id"]] = _fault(row, exc, "its stored expression or template is unusable")
                continue
            task, values = known
            self._cache[t["id"]] = _Compiled(
                version=row["version"],
                spec=spec,
                task=task,
                values=values,
                key_prefix=idempotency_key(t["id"], _NO_TICK).removesuffix(_iso(_NO_TICK)),
                id_text=str(t["id"]),
            )
        return faults

    def _announce(self, firings: list[_Firing], inserted: list[Row]) -> None:
        """After the commit: counts the firings (the lag is from each tick to about now)
        and publishes the new tasks' transitions."""
        if not firings:
            return
        self.fired += len(firings)
        committed = self.now()
        self.deps.metrics.record_firing_lags(
            (f.tenant, (committed - f.tick).total_seconds()) for f in firings
        )
        self.deps.after_commit.publish(Cause.FIRED, inserted)


# Positions in store.due's rows (a record read by position costs less than by name): the
# id, the tenant, and the ScheduleState fields in their order.
_ID = store.DUE_COLUMNS.index("id")
_TENANT = store.DUE_COLUMNS.index("tenant")
_STATE = tuple(store.DUE_COLUMNS.index(f.name) for f in dataclasses.fields(ScheduleState))


def _fault(row: asyncpg.Record, exc: Exception, what: str) -> str:
    """Says once that a schedule is set aside; returns the reason to store with it."""
    reason = f"{what}: {type(exc).__name__}: {exc}"[:1000]
    _log.error(
        "schedule %s (%r) of tenant %r set aside, the firer cannot use it: %s; the other "
        "schedules fire. UpdateSchedule or ResumeSchedule gives it a fresh start",
        row["id"],
        row["name"],
        row["tenant"],
        reason,
        # An unexpected kind of failure is a bug here, not a bad value: keep its traceback.
        exc_info=None if isinstance(exc, _EXPECTED_FAULTS) else exc,
    )
    return reason


def _tick(firing: _Firing) -> datetime:
    return firing.tick


def _advance(
    schedule_id: str, decided: Plan, mine: list[_Firing], recheck: datetime
) -> store.Advance:
    wake = decided.next_fire_time
    if decided.buffered_tick is not None and (wake is None or recheck < wake):
        wake = recheck  # look again soon: the previous firing may finish any time
    fired = [f for f in mine if f.refused is None]
    return store.Advance(
        id=schedule_id,
        next_fire_time=decided.next_fire_time,
        wake_time=wake,
        buffered_tick=decided.buffered_tick,
        last_task_id=fired[-1].task_id if fired else None,
    )


_NO_TICK = datetime(2000, 1, 1, tzinfo=UTC)
"""Any tick: the key prefix is the key of a tick without that tick's text."""
