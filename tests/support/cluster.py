"""A process harness for distributed scenarios: coordinators and workers as separate
processes (real signals), a load generator that records every acknowledged submit, and the
checker that compares that record, the database and the workers' side effects.

Typical scenario (leader SIGKILLed under load)::

    coords = [CoordinatorProcess(dsn, etcd_cluster.endpoints, log_dir=tmp_path, name=f"c{i}")
              for i in range(3)]
    for c in coords:
        c.start()
    for c in coords:
        await c.wait_serving()
    first = await wait_for_leader(dsn)                # the leadership row in PostgreSQL
    addresses = ",".join(c.address for c in coords)
    effects = tmp_path / "effects.log"
    workers = [WorkerProcess(addresses, effects, log_dir=tmp_path, concurrency=50).start()
               for _ in range(2)]
    load = LoadGenerator(addresses, count=1000, rate=500)
    load.start()
    await load.wait_acknowledged(300)
    next(c for c in coords if c.address == first["address"]).kill()
    await wait_for_leader(dsn, newer_than=first["epoch"])
    log = await load.wait(timeout=120)
    violations = await Checker(log, effects).check(dsn, wait_settled=60)
    assert not violations, "\n".join(violations)
    # finally: close() every process

The processes are ``processes.ManagedProcess`` objects (the tests' one process harness):
each in its own process group, its output in ``<log_dir>/<name>.log``. ``close()``
SIGKILLs whatever still runs: call it in a ``finally``. What can wait long (``stop``,
``wait_serving``) is async, so the event loop keeps running the load generator meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from clitools import CLI
from grpc_health.v1 import health_pb2
from processes import ManagedProcess, free_ports
from testsupport import eventually, health_stub

SUPPORT_DIR = Path(__file__).parent

# Task states and attempt outcomes as stored (the conveyor.v1 enum numbers).
STATE_NAMES = {
    1: "PENDING",
    2: "SCHEDULED",
    3: "RUNNING",
    4: "SUCCEEDED",
    5: "DEAD",
    6: "CANCELLED",
}
SUCCEEDED = 4
OUTCOME_SUCCEEDED = 2


def _join(values: str | Sequence[str]) -> str:
    return values if isinstance(values, str) else ",".join(values)


# -- processes ----------------------------------------------------------------------------


class CoordinatorProcess(ManagedProcess):
    """``conveyor coordinator`` as a separate process.

    With ``etcd_endpoints`` it joins the replicated cluster
    (``--etcd --advertise --cluster --election-ttl``); with None it runs single-node (and
    none of those flags is passed, so this works before etcd support exists). ``port``
    defaults to a free one, kept across restarts so clients' address lists stay valid.
    """

    def __init__(
        self,
        dsn: str,
        etcd_endpoints: str | Sequence[str] | None,
        *,
        log_dir: Path | str,
        cluster: str = "test",
        port: int | None = None,
        advertise: str | None = None,
        name: str | None = None,
        election_ttl: float | None = 2.0,
        lease_duration: float = 2.0,
        heartbeat_interval: float = 0.5,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        insecure: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = port if port is not None else free_ports(1, host.strip("[]"))[0]
        super().__init__(name or f"coordinator-{self.port}", log_dir, env)
        self.dsn = dsn
        self.etcd = _join(etcd_endpoints) if etcd_endpoints else None
        self.cluster = cluster
        # ``host`` "[::1]" listens on (and is dialled over) IPv6 loopback.
        self.listen = f"{host}:{self.port}"
        self.advertise = advertise or self.listen
        self.election_ttl = election_ttl
        self.lease_duration = lease_duration
        self.heartbeat_interval = heartbeat_interval
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        # Authentication off unless a test is about it (tests/integration/security).
        self.insecure = insecure

    @property
    def address(self) -> str:
        """``HOST:PORT`` (``127.0.0.1:PORT`` by default), what clients and workers dial."""
        return self.listen

    def environment(self) -> dict[str, str]:
        env = super().environment()
        # Only the flags decide the mode: a CONVEYOR_ETCD in the caller's shell must not
        # turn a single-node coordinator into an etcd one.
        for name in ("CONVEYOR_ETCD", "CONVEYOR_ADVERTISE", "CONVEYOR_LISTEN", "CONVEYOR_DSN"):
            if name not in self.extra_env:
                env.pop(name, None)
        return env

    def command(self) -> list[str]:
        args = [
            *CLI,
            "--log-level",
            self.log_level,
            "coordinator",
            "--dsn",
            self.dsn,
            "--listen",
            self.listen,
            "--cluster",
            self.cluster,
            "--lease-duration",
            str(self.lease_duration),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
        ]
        if self.etcd:
            args += ["--advertise", self.advertise, "--etcd", self.etcd]
            if self.election_ttl is not None:
                args += ["--election-ttl", str(self.election_ttl)]
        if self.insecure:
            args.append("--insecure")
        return [*args, *self.extra_args]

    async def health(self, timeout: float = 1.0) -> int | None:
        """One gRPC health check (service ""): the status number, None when unreachable."""
        return await health_status(self.address, timeout)

    async def wait_serving(self, timeout: float = 30.0) -> None:
        """Polls the health check until SERVING; fails early (with the log) if it exits."""

        async def up() -> bool:
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) before serving; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            return await self.health() == health_pb2.HealthCheckResponse.SERVING

        try:
            await eventually(up, timeout=timeout, what=f"{self.name} at {self.address} to serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log {self.log_path}:\n{self.log_tail()}") from None


class WorkerProcess(ManagedProcess):
    """``conveyor worker worker_app:worker`` as a separate process.

    ``coordinators`` is one address or several (comma-joined when a list); every completed
    handler run appends ``<task id> <attempt>`` to ``effects_log`` (see worker_app.py).
    """

    def __init__(
        self,
        coordinators: str | Sequence[str],
        effects_log: Path | str,
        *,
        log_dir: Path | str,
        name: str | None = None,
        app: str = "worker_app:worker",
        concurrency: int = 10,
        grace: float = 10.0,
        queues: Sequence[str] | None = None,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name or f"worker-{uuid.uuid4().hex[:6]}", log_dir, env)
        self.coordinators = _join(coordinators)
        self.effects_log = Path(effects_log)
        self.app = app
        self.concurrency = concurrency
        self.grace = grace
        self.queues = tuple(queues) if queues else None
        self.log_level = log_level
        self.extra_args = tuple(extra_args)

    def environment(self) -> dict[str, str]:
        python_path = os.pathsep.join(
            p for p in (str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")) if p
        )
        return {
            **super().environment(),
            "CONVEYOR_COORDINATOR": self.coordinators,
            "CONVEYOR_TEST_LOG": str(self.effects_log),
            "CONVEYOR_TEST_CONCURRENCY": str(self.concurrency),
            "CONVEYOR_TEST_GRACE": str(self.grace),
            "PYTHONPATH": python_path,
            **self.extra_env,
        }

    def command(self) -> list[str]:
        args = [
            *CLI,
            "--log-level",
            self.log_level,
            "--coordinator",
            self.coordinators,
            "worker",
            self.app,
            "--concurrency",
            str(self.concurrency),
        ]
        if self.queues:
            args += ["--queues", ",".join(self.queues)]
        return [*args, *self.extra_args]


async def health_status(
    address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> int | None:
    """One gRPC health check (service "") of ``address``, over TLS with ``credentials``:
    the status number, None when unreachable."""
    options = [("grpc.enable_http_proxy", 0)]
    channel = (
        grpc.aio.insecure_channel(address, options=options)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, options=options)
    )
    async with channel:
        try:
            reply = await health_stub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)


async def serving(address: str, timeout: float = 1.0) -> bool:
    """Whether gRPC health at ``address`` says SERVING now."""
    return await health_status(address, timeout) == health_pb2.HealthCheckResponse.SERVING


async def current_leadership(dsn: str, cluster: str = "test") -> dict[str, Any] | None:
    """The ``leadership`` row of ``cluster`` (epoch, leader_id, address), None before any
    leader took office. Ground truth of who may write, read straight from PostgreSQL."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT epoch, leader_id, address FROM leadership WHERE cluster = $1", cluster
        )
    finally:
        await conn.close()
    return dict(row) if row is not None else None


async def wait_for_leader(
    dsn: str, cluster: str = "test", *, newer_than: int = 0, timeout: float = 30.0
) -> dict[str, Any]:
    """Polls ``leadership`` until a leader with an epoch above ``newer_than`` is recorded."""

    async def newer() -> dict[str, Any] | None:
        last = await current_leadership(dsn, cluster)
        return last if last is not None and last["epoch"] > newer_than else None

    return await eventually(
        newer,
        timeout=timeout,
        what=f"a leader of cluster {cluster!r} with epoch > {newer_than}",
    )


# -- load generator -----------------------------------------------------------------------


@dataclass
class SubmitLog:
    """What a load generator did: every submit it made and which ones were acknowledged.

    Keys are ``<run_id>-<index>``; a key in ``acknowledged`` maps to the task id the
    coordinator answered with. A key in ``failed`` was given up on (never acknowledged);
    its task may or may not have been committed.
    """

    run_id: str
    task_type: str = "noop"
    queue: str = "default"
    count: int = 0
    acknowledged: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    """Submit calls made, retries included."""
    errors: Counter[str] = field(default_factory=Counter)
    """Errors seen on calls that were then retried, by exception type."""
    slowest: float = 0.0
    """The longest an acknowledged submit took, in seconds, from its first call to its
    acknowledgement (retries and the client's own failover included)."""

    def key(self, index: int) -> str:
        return f"{self.run_id}-{index:06d}"

    @property
    def key_prefix(self) -> str:
        return f"{self.run_id}-"

    def save(self, path: Path | str) -> None:
        """Writes the log as JSON (handy beside the process logs when a scenario fails)."""
        data = {
            "run_id": self.run_id,
            "task_type": self.task_type,
            "queue": self.queue,
            "count": self.count,
            "acknowledged": self.acknowledged,
            "failed": self.failed,
            "calls": self.calls,
            "errors": dict(self.errors),
            "slowest": self.slowest,
        }
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


class LoadGenerator:
    """Submits ``count`` tasks at ``rate`` per second through ``AsyncClient`` against the
    coordinators, each with its own idempotency key, so a submit is retried (same key)
    until acknowledged or ``give_up_after`` seconds pass. Records everything in ``log``.

    ``start()`` runs it in the background; ``wait_acknowledged(n)`` lets a scenario act
    mid-load (kill the leader after 300 acknowledgements); ``wait()`` returns the log.
    """

    def __init__(
        self,
        coordinators: str | Sequence[str],
        *,
        count: int,
        rate: float,
        task_type: str = "noop",
        queue: str = "default",
        payload: bytes = b"",
        max_in_flight: int = 200,
        call_timeout: float = 10.0,
        give_up_after: float = 60.0,
        run_id: str | None = None,
    ) -> None:
        if count < 0 or rate <= 0:
            raise ValueError("count must be >= 0 and rate > 0")
        self.coordinators = _join(coordinators)
        self.rate = rate
        self.payload = payload
        self.max_in_flight = max_in_flight
        self.call_timeout = call_timeout
        self.give_up_after = give_up_after
        self.log = SubmitLog(
            run_id=run_id or f"load-{uuid.uuid4().hex[:10]}",
            task_type=task_type,
            queue=queue,
            count=count,
        )
        self._task: asyncio.Task[SubmitLog] | None = None
        self._finished = False
        self._progress = asyncio.Condition()

    def start(self) -> asyncio.Task[SubmitLog]:
        """Runs :meth:`run` in the background (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"load {self.log.run_id}")
        return self._task

    async def wait(self, timeout: float | None = None) -> SubmitLog:
        """Waits for the background run to finish; returns the log."""
        return await asyncio.wait_for(asyncio.shield(self.start()), timeout)

    async def wait_acknowledged(self, count: int, timeout: float = 30.0) -> None:
        """Waits until ``count`` submits are acknowledged (fails if the run ends first)."""

        def reached() -> bool:
            return len(self.log.acknowledged) >= count or self._finished

        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(reached), timeout)
        if len(self.log.acknowledged) < count:
            raise AssertionError(
                f"the load ended with {len(self.log.acknowledged)} acknowledged, not {count}"
            )

    async def run(self) -> SubmitLog:
        from conveyor.client import AsyncClient

        slots = asyncio.Semaphore(self.max_in_flight)
        start = time.monotonic()
        async with AsyncClient(self.coordinators, timeout=self.call_timeout) as client:

            async def one(index: int) -> None:
                async with slots:
                    await self._submit(client, self.log.key(index))

            pending: list[asyncio.Task[None]] = []
            try:
                for index in range(self.log.count):
                    delay = start + index / self.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    pending.append(asyncio.create_task(one(index)))
                await asyncio.gather(*pending)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                self._finished = True
                async with self._progress:
                    self._progress.notify_all()
        return self.log

    async def _submit(self, client: Any, key: str) -> None:
        from conveyor.client import ConveyorError, IdempotencyConflictError, InvalidArgumentError

        started = time.monotonic()
        deadline = started + self.give_up_after
        delay = 0.05
        while True:
            self.log.calls += 1
            try:
                task = await client.submit(
                    self.log.task_type,
                    self.payload,
                    queue=self.log.queue,
                    idempotency_key=key,
                    raw=True,
                )
            except (InvalidArgumentError, IdempotencyConflictError) as exc:
                self.log.failed[key] = f"{type(exc).__name__}: {exc}"
                return
            except ConveyorError as exc:
                self.log.errors[type(exc).__name__] += 1
                if time.monotonic() + delay >= deadline:
                    self.log.failed[key] = f"gave up after {self.give_up_after}s: {exc}"
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.log.acknowledged[key] = task.id
            self.log.slowest = max(self.log.slowest, time.monotonic() - started)
            async with self._progress:
                self._progress.notify_all()
            return


async def submit_load(
    coordinators: str | Sequence[str], count: int, rate: float, **options: Any
) -> SubmitLog:
    """Runs a :class:`LoadGenerator` to the end and returns its log."""
    return await LoadGenerator(coordinators, count=count, rate=rate, **options).run()


# -- the checker --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRow:
    id: str
    idempotency_key: str | None
    state: int
    attempt: int = 0


@dataclass(frozen=True)
class AttemptRow:
    task_id: str
    attempt: int
    outcome: int
    worker_id: str = ""
    epoch: int = 0


@dataclass
class CheckReport:
    violations: list[str]
    acknowledged: int = 0
    tasks_in_scope: int = 0
    succeeded: int = 0
    repeated_effects: int = 0
    """Tasks whose handler completed more than once (allowed: delivery is at-least-once)."""
    committed_unacknowledged: int = 0
    """Tasks of given-up submits that were committed anyway (allowed: the reply was lost)."""


def read_effects(path: Path | str) -> list[tuple[str, int]]:
    """(task id, attempt) per completed handler run, from the worker app's log. A torn
    last line (a worker killed mid-write) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    runs: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            runs.append((fields[0], int(fields[1])))
    return runs


def read_starts(path: Path | str) -> list[tuple[str, int]]:
    """(task id, attempt) per handler run that began (the ``sleep`` handler's
    ``started`` lines in the worker app's log)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [
        (fields[1], int(fields[2]))
        for fields in map(str.split, text.splitlines())
        if len(fields) == 3 and fields[0] == "started" and fields[2].isdigit()
    ]


def _state(value: int) -> str:
    return STATE_NAMES.get(value, f"state {value}")


def evaluate(
    log: SubmitLog,
    tasks: Sequence[TaskRow],
    attempts: Sequence[AttemptRow],
    effects: Sequence[tuple[str, int]],
    *,
    allow_unacknowledged: bool = False,
) -> CheckReport:
    """Compares what was acknowledged with what the database and the side effects show.

    ``tasks`` are the rows in scope of ``log`` (idempotency key with the log's prefix, or
    no key and the log's type and queue); ``attempts`` the ``task_attempts`` rows of those
    tasks; ``effects`` the (task id, attempt) of every completed handler run. Pure: no I/O.
    """
    runs: defaultdict[str, list[int]] = defaultdict(list)
    for task_id, attempt in effects:
        runs[task_id].append(attempt)
    violations = _check_submits(log, tasks, allow_unacknowledged=allow_unacknowledged)
    extras, committed_unacked = _check_extras(log, tasks)
    violations += extras
    violations += _check_outcomes(log, tasks, attempts, runs)
    return CheckReport(
        violations=violations,
        acknowledged=len(log.acknowledged),
        tasks_in_scope=len(tasks),
        succeeded=sum(1 for t in tasks if t.state == SUCCEEDED),
        repeated_effects=sum(1 for t in tasks if len(runs.get(t.id, [])) > 1),
        committed_unacknowledged=committed_unacked,
    )


def _check_submits(
    log: SubmitLog, tasks: Sequence[TaskRow], *, allow_unacknowledged: bool
) -> list[str]:
    """Acknowledged means committed, exactly once per key."""
    violations: list[str] = []
    by_id = {t.id: t for t in tasks}
    by_key: defaultdict[str | None, list[TaskRow]] = defaultdict(list)
    for t in tasks:
        by_key[t.idempotency_key].append(t)
    keys_by_id: defaultdict[str, list[str]] = defaultdict(list)
    for key, task_id in sorted(log.acknowledged.items()):
        keys_by_id[task_id].append(key)
        rows = by_key.get(key, [])
        if task_id not in by_id:
            found = f" (the key is held by {[r.id for r in rows]})" if rows else ""
            violations.append(
                f"lost: task {task_id} (key {key}) was acknowledged but is not in the "
                f"database{found}"
            )
        elif by_id[task_id].idempotency_key != key:
            violations.append(
                f"mismatch: key {key} was acknowledged as task {task_id}, whose key in the "
                f"database is {by_id[task_id].idempotency_key!r}"
            )
        if len(rows) > 1:
            violations.append(
                f"duplicate: key {key} has {len(rows)} tasks in the database: "
                f"{sorted(r.id for r in rows)}"
            )
    for task_id, keys in sorted(keys_by_id.items()):
        if len(keys) > 1:
            violations.append(f"duplicate: keys {keys} were all acknowledged as task {task_id}")
    if not allow_unacknowledged:
        for key, error in sorted(log.failed.items()):
            violations.append(f"unacknowledged submit: key {key} was given up on ({error})")
    return violations


def _check_extras(log: SubmitLog, tasks: Sequence[TaskRow]) -> tuple[list[str], int]:
    """Rows nobody was told about. A given-up submit may have committed (its reply was
    lost): counted, not a violation. Anything else is."""
    acked_ids = set(log.acknowledged.values())
    violations: list[str] = []
    committed_unacked = 0
    for t in sorted(tasks, key=lambda t: t.id):
        if t.id in acked_ids:
            continue
        if t.idempotency_key is not None and t.idempotency_key in log.failed:
            committed_unacked += 1
            continue
        violations.append(
            f"unacknowledged extra: task {t.id} (key {t.idempotency_key}) is in the "
            f"database, but no submit of run {log.run_id} was acknowledged as it"
        )
    return violations, committed_unacked


def _check_outcomes(
    log: SubmitLog,
    tasks: Sequence[TaskRow],
    attempts: Sequence[AttemptRow],
    runs: Mapping[str, list[int]],
) -> list[str]:
    """Every acknowledged task SUCCEEDED, by exactly one SUCCEEDED attempt, whose handler
    run the worker log shows."""
    violations: list[str] = []
    by_id = {t.id: t for t in tasks}
    wins_by_task: defaultdict[str, list[AttemptRow]] = defaultdict(list)
    for a in attempts:
        if a.outcome == OUTCOME_SUCCEEDED:
            wins_by_task[a.task_id].append(a)

    for task_id in sorted(set(log.acknowledged.values())):
        row = by_id.get(task_id)
        if row is not None and row.state != SUCCEEDED:
            violations.append(
                f"unfinished: task {task_id} ends {_state(row.state)} (attempt {row.attempt}), "
                f"not SUCCEEDED"
            )
        if not runs.get(task_id):
            violations.append(
                f"no effect: task {task_id} was acknowledged but the worker log shows no "
                f"completed run of it"
            )
    for t in sorted(tasks, key=lambda t: t.id):
        wins = sorted(wins_by_task.get(t.id, []), key=lambda a: a.attempt)
        task_runs = runs.get(t.id, [])
        if len(wins) > 1:
            detail = ", ".join(
                f"attempt {a.attempt} epoch {a.epoch} by {a.worker_id}" for a in wins
            )
            violations.append(
                f"double success: task {t.id} has {len(wins)} SUCCEEDED attempts ({detail})"
            )
        if t.state == SUCCEEDED and not wins:
            violations.append(
                f"bookkeeping: task {t.id} is SUCCEEDED but task_attempts has no SUCCEEDED "
                f"attempt for it"
            )
        violations.extend(
            f"phantom success: task {t.id} SUCCEEDED on attempt {a.attempt}, but the worker "
            f"log has no completed run of that attempt (runs: {sorted(task_runs)})"
            for a in wins
            if a.attempt not in task_runs
        )
    return violations


class Checker:
    """Checks a finished load (``log``) against PostgreSQL and the effects log.

    ``await Checker(log, effects_path).check(dsn)`` returns the violations as readable
    strings (empty when all is well). With ``wait_settled``, it first polls (up to that many
    seconds) until every acknowledged task has reached a terminal state, so a scenario can
    call it as soon as the load ends.
    """

    def __init__(
        self, log: SubmitLog, effects_log: Path | str, *, allow_unacknowledged: bool = False
    ) -> None:
        self.log = log
        self.effects_log = Path(effects_log)
        self.allow_unacknowledged = allow_unacknowledged

    async def fetch(self, dsn: str) -> tuple[list[TaskRow], list[AttemptRow]]:
        """The rows in scope of the log, straight from the database."""
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            task_rows = await conn.fetch(
                """
                SELECT id::text AS id, idempotency_key, state, attempt FROM tasks
                WHERE starts_with(idempotency_key, $1)
                   OR (idempotency_key IS NULL AND type = $2 AND queue = $3)
                """,
                self.log.key_prefix,
                self.log.task_type,
                self.log.queue,
            )
            ids = [r["id"] for r in task_rows]
            attempt_rows = await conn.fetch(
                "SELECT task_id::text AS task_id, attempt, outcome, worker_id, epoch "
                "FROM task_attempts WHERE task_id = ANY($1::uuid[])",
                ids,
            )
        finally:
            await conn.close()
        tasks = [
            TaskRow(r["id"], r["idempotency_key"], r["state"], r["attempt"]) for r in task_rows
        ]
        attempts = [
            AttemptRow(r["task_id"], r["attempt"], r["outcome"], r["worker_id"], r["epoch"])
            for r in attempt_rows
        ]
        return tasks, attempts

    async def wait_settled(self, dsn: str, timeout: float) -> None:
        """Polls until every acknowledged task is terminal (SUCCEEDED, DEAD, CANCELLED), or
        ``timeout`` passes (then returns: check() reports what is left)."""
        import asyncpg

        ids = list(self.log.acknowledged.values())
        conn = await asyncpg.connect(dsn)
        try:

            async def settled() -> bool:
                open_count: int = await conn.fetchval(
                    "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND state IN (1,2,3)",
                    ids,
                )
                return open_count == 0

            # Not settled in time is no failure here: check() reports what is left.
            with contextlib.suppress(AssertionError):
                await eventually(settled, timeout=timeout, interval=0.1, what="settled tasks")
        finally:
            await conn.close()

    async def report(self, dsn: str, *, wait_settled: float = 0.0) -> CheckReport:
        if wait_settled > 0:
            await self.wait_settled(dsn, wait_settled)
        tasks, attempts = await self.fetch(dsn)
        return evaluate(
            self.log,
            tasks,
            attempts,
            read_effects(self.effects_log),
            allow_unacknowledged=self.allow_unacknowledged,
        )

    async def check(self, dsn: str, *, wait_settled: float = 0.0) -> list[str]:
        """The violations, as readable strings (empty: every guarantee held)."""
        return (await self.report(dsn, wait_settled=wait_settled)).violations


async def fencing_violations(dsn: str, cluster: str = "test") -> list[str]:
    """Dispatch-side writes made by an epoch after a newer term had begun.

    With fencing, none can exist: every claim and result carries its epoch check in the
    same statement, serialised with the newer leader taking office. A lease stamped by an
    older epoch that started after a newer term began is such a write.
    """
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT a.task_id::text AS task, a.attempt, a.epoch, a.start_time,
                   newer.epoch AS newer_epoch, newer.start_time AS newer_start
            FROM (
                SELECT task_id, attempt, epoch, start_time FROM task_attempts
                UNION ALL
                SELECT id, attempt, lease_epoch, lease_start_time FROM tasks
                WHERE lease_start_time IS NOT NULL
            ) a
            JOIN leadership_terms newer
              ON newer.cluster = $1 AND newer.epoch > a.epoch
             AND a.start_time > newer.start_time
            ORDER BY a.start_time
            """,
            cluster,
        )
    finally:
        await conn.close()
    return [
        f"task {r['task']} attempt {r['attempt']} was leased by epoch {r['epoch']} at "
        f"{r['start_time']:%H:%M:%S.%f}, after epoch {r['newer_epoch']} took office at "
        f"{r['newer_start']:%H:%M:%S.%f}"
        for r in rows
    ]
