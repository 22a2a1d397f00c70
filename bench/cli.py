"""``conveyor bench``, ``bench-schedules``, ``bench-failover``, ``bench-tenants``,
``bench-deps``, ``bench-streams`` and ``bench-floor``: the benchmarks' commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Annotated, Any

import typer

from conveyor.cli.app import Globals, command

DSN_HELP = "PostgreSQL to use (its database must be empty or Conveyor's); default: embedded."
JSON_HELP = "End with one JSON line of the figures."
# Options of the benchmarks that submit and drain no-op tasks (bench, bench-deps).
Workers = Annotated[int, typer.Option("--workers", min=1, help="Worker processes.")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="Slots per worker.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Tasks per SubmitTasks.")]
Submitters = Annotated[int, typer.Option("--submitters", min=1, help="Concurrent submit calls.")]


def register(app: typer.Typer) -> None:
    command(
        app,
        "bench",
        example=[
            "conveyor bench",
            "conveyor bench --tasks 5000 --json",
            "conveyor bench --insecure",
            "conveyor bench --metrics --json",
            "conveyor bench --rate-limit 1000000 --concurrency-keys 100 --json",
            "conveyor bench --backlog 10000000 --churn 1000000 --json",
        ],
    )(bench)
    command(
        app,
        "bench-schedules",
        example=[
            "conveyor bench-schedules --json",
            "conveyor bench-schedules --schedules 1000",
            "conveyor bench-schedules --per-second 10000 --per-minute 90000 --json",
        ],
    )(bench_schedules)
    command(app, "bench-failover", example="conveyor bench-failover --runs 7 --json")(
        bench_failover
    )
    command(app, "bench-deps", example=["conveyor bench-deps", "conveyor bench-deps --json"])(
        bench_deps
    )
    command(
        app,
        "bench-tenants",
        example=[
            "conveyor bench-tenants --json",
            "conveyor bench-tenants --seconds 20",
            "conveyor bench-tenants --backlog 100000 --rate 10 --json",
        ],
    )(bench_tenants)
    command(
        app,
        "bench-console",
        example=["conveyor bench-console --json", "conveyor bench-console --tasks 100000"],
    )(bench_console)
    command(
        app,
        "bench-streams",
        example=[
            "conveyor bench-streams --json",
            "conveyor bench-streams --streams 1000 --per-connection 100",
        ],
    )(bench_streams)
    command(
        app,
        "bench-floor",
        example=[
            "conveyor bench-floor --json",
            "conveyor bench-floor --commit --rate 50",
            "conveyor bench-floor --commit --stream --json",
        ],
    )(bench_floor)


def _print_figures(figures: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(figures), flush=True)
    return 0


def bench(
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="No-op tasks per run.")] = 20_000,
    workers: Workers = 2,
    concurrency: Concurrency = 500,
    batch: Batch = 500,
    submitters: Submitters = 4,
    latency_rate: Annotated[
        float, typer.Option("--latency-rate", help="Tasks/s when timing pickup.")
    ] = 100.0,
    latency_seconds: Annotated[
        float, typer.Option("--latency-seconds", help="Seconds of the pickup run.")
    ] = 10.0,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Authentication off, to compare (by default every call has a key)."
        ),
    ] = False,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            help="Coordinator and workers serve metrics, scraped every --scrape-interval "
            "(compare a run without).",
        ),
    ] = False,
    scrape_interval: Annotated[
        float,
        typer.Option(
            "--scrape-interval",
            min=0.1,
            help="Seconds between scrapes with --metrics (Prometheus's default is 60, "
            "a usual setting 15; 1 is harsh on purpose).",
        ),
    ] = 1.0,
    rate_limit: Annotated[
        float | None,
        typer.Option(
            "--rate-limit",
            min=0.001,
            help="A rate limit (tasks/s, burst one second's worth) on the benchmark's queue, "
            "so every claim is the limited one; set it above the throughput to measure what "
            "the rule costs.",
        ),
    ] = None,
    concurrency_keys: Annotated[
        int,
        typer.Option(
            "--concurrency-keys",
            min=0,
            help="The end-to-end and pickup tasks carry one of this many concurrency keys "
            "(each limited to all the workers' slots, so it never binds): every claim is "
            "the keyed one, taking turns between keys. 0: none.",
        ),
    ] = 0,
    backlog: Annotated[
        int,
        typer.Option(
            "--backlog",
            min=0,
            help="Measure at depth instead: this many tasks wait in the queue (written by "
            "binary COPY) while the dispatch and submit rates are measured, with the "
            "table's and indexes' sizes and the claim's plan. Compare 10000 with 10000000.",
        ),
    ] = 0,
    dispatch: Annotated[
        int,
        typer.Option(
            "--dispatch", min=1, help="With --backlog: tasks per measured dispatch window."
        ),
    ] = 50_000,
    churn: Annotated[
        int,
        typer.Option(
            "--churn",
            min=0,
            help="With --backlog: tasks dispatched before a second window (dead rows piled "
            "up); 0: one window.",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure throughput, pickup latency, CPU per task and idle worker memory: a
    coordinator and workers as processes. With --backlog: the dispatch and submit rates
    with that many tasks waiting."""
    if backlog:
        from conveyor.bench.backlog import BacklogConfig
        from conveyor.bench.backlog import run as run_backlog

        deep = BacklogConfig(
            backlog=backlog,
            dispatch=dispatch,
            churn=churn,
            tasks=tasks,
            workers=workers,
            concurrency=concurrency,
            batch=batch,
            submitters=submitters,
            dsn=dsn,
        )
        return _print_figures(asyncio.run(run_backlog(deep)), as_json)
    try:
        import psutil  # noqa: F401  (reads the processes' CPU and memory)
    except ImportError:
        print(
            "conveyor: conveyor bench needs psutil: pip install 'conveyor[bench]'", file=sys.stderr
        )
        return 2
    from conveyor.bench.runner import BenchConfig, run

    config = BenchConfig(
        tasks=tasks,
        workers=workers,
        concurrency=concurrency,
        batch=batch,
        submitters=submitters,
        latency_rate=latency_rate,
        latency_seconds=latency_seconds,
        dsn=dsn,
        insecure=insecure,
        metrics=metrics,
        scrape_interval=scrape_interval,
        rate_limit=rate_limit,
        concurrency_keys=concurrency_keys,
    )
    return _print_figures(asyncio.run(run(config)), as_json)


def bench_schedules(
    schedules: Annotated[
        int, typer.Option("--schedules", min=1, help="Schedules to create.")
    ] = 10_000,
    cron: Annotated[str, typer.Option("--cron", help="Their expression.")] = "* * * * * *",
    seconds: Annotated[
        float, typer.Option("--seconds", help="Length of the measured window.")
    ] = 20.0,
    warm_up: Annotated[float, typer.Option("--warm-up", help="Seconds before the window.")] = 5.0,
    per_second: Annotated[
        int,
        typer.Option(
            "--per-second",
            min=0,
            help="Schedules every second ('* * * * * *'); with --per-minute, instead of "
            "--schedules and --cron.",
        ),
    ] = 0,
    per_minute: Annotated[
        int,
        typer.Option(
            "--per-minute",
            min=0,
            help="Schedules every minute ('* * * * *', all at second 0); the window then "
            "crosses at least two minute boundaries.",
        ),
    ] = 0,
    minute_boundaries: Annotated[
        int,
        typer.Option(
            "--minute-boundaries",
            min=0,
            help="With --per-minute: the window is made long enough to hold this many "
            "minute boundaries (second 0).",
        ),
    ] = 2,
    create_concurrency: Annotated[
        int, typer.Option("--create-concurrency", min=1, help="CreateSchedule calls at once.")
    ] = 64,
    api_creates: Annotated[
        int,
        typer.Option(
            "--api-creates",
            min=0,
            help="Schedules created through CreateSchedule (its rate is reported); the "
            "rest are validated the same way and inserted in batches.",
        ),
    ] = 2_000,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn", help="PostgreSQL to use: an empty database, with track_commit_timestamp on."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure the firing lag of many schedules (tick to task committed), by kind and at
    the minute boundary."""
    from conveyor.bench.schedules import run

    args = argparse.Namespace(
        schedules=schedules,
        cron=cron,
        per_second=per_second,
        per_minute=per_minute,
        minute_boundaries=minute_boundaries,
        api_creates=api_creates,
        seconds=seconds,
        warm_up=warm_up,
        create_concurrency=create_concurrency,
        dsn=dsn,
    )
    return _print_figures(asyncio.run(run(args)), as_json)


def bench_failover(
    runs: Annotated[int, typer.Option("--runs", min=1, help="Leader kills.")] = 5,
    coordinators: Annotated[
        int, typer.Option("--coordinators", min=2, help="Coordinator processes.")
    ] = 3,
    election_ttl: Annotated[
        float, typer.Option("--election-ttl", help="Their etcd lease TTL, seconds.")
    ] = 2.0,
    rate: Annotated[float, typer.Option("--rate", help="Tasks submitted per second.")] = 50.0,
    etcd: Annotated[
        str | None,
        typer.Option(
            "--etcd",
            metavar="URL[,URL]",
            help="etcd to elect on (default: one started here from a local etcd binary).",
        ),
    ] = None,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure leader failover: from a leader's SIGKILL to the next leader's first dispatch."""
    from conveyor.bench.failover import run

    args = argparse.Namespace(
        runs=runs,
        coordinators=coordinators,
        election_ttl=election_ttl,
        rate=rate,
        etcd=etcd,
        dsn=dsn,
    )
    return _print_figures(asyncio.run(run(args)), as_json)


def bench_tenants(
    seconds: Annotated[
        float, typer.Option("--seconds", help="Length of each of tenant B's two runs.")
    ] = 10.0,
    rate: Annotated[float, typer.Option("--rate", help="Tenant B's submits per second.")] = 50.0,
    flood_rate: Annotated[
        float, typer.Option("--flood-rate", help="Tenant A's submit rate limit (tasks/s).")
    ] = 1000.0,
    flood_callers: Annotated[
        int, typer.Option("--flood-callers", min=1, help="Tenant A's concurrent submit calls.")
    ] = 4,
    flood_batch: Annotated[
        int, typer.Option("--flood-batch", min=1, max=1000, help="Tasks per tenant A call.")
    ] = 500,
    backlog: Annotated[
        int,
        typer.Option(
            "--backlog",
            min=0,
            help="Tasks of tenant A waiting in the shared queue before each run beside it.",
        ),
    ] = 0,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure tenant fairness: tenant B's submit and pickup latency alone, then while
    tenant A floods past its limits. The target: B's p99 submit and pickup latency while
    flooded at most 2x its p99 alone (the report's "within 2x" line says whether it is)."""
    from conveyor.bench.tenants import TenantsConfig, run

    config = TenantsConfig(
        seconds=seconds,
        rate=rate,
        flood_rate=flood_rate,
        callers=flood_callers,
        batch=flood_batch,
        backlog=backlog,
        dsn=dsn,
    )
    return _print_figures(asyncio.run(run(config)), as_json)


def bench_console(
    tasks: Annotated[
        int, typer.Option("--tasks", min=1, help="Tasks written into the table first.")
    ] = 1_000_000,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed GETs per page.")] = 10,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure the web console: each page's time to answer with --tasks tasks stored (the
    target is under 300 ms with 1,000,000)."""
    from conveyor.bench.console import ConsoleBenchConfig, run

    figures = asyncio.run(run(ConsoleBenchConfig(tasks=tasks, runs=runs, dsn=dsn)))
    if not as_json:
        for path, took in figures["pages"].items():
            print(f"{took['median_ms']:8.1f} ms  (max {took['max_ms']:.1f})  {path}", flush=True)
    return _print_figures(figures, as_json)


def bench_deps(
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="Tasks per scenario.")] = 10_000,
    workers: Workers = 2,
    concurrency: Concurrency = 500,
    batch: Batch = 500,
    submitters: Submitters = 4,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure fan-out and fan-in of many tasks against the same tasks without dependencies."""
    from conveyor.bench.dependencies import run

    args = argparse.Namespace(
        tasks=tasks,
        workers=workers,
        concurrency=concurrency,
        batch=batch,
        submitters=submitters,
        dsn=dsn,
    )
    return _print_figures(asyncio.run(run(args)), as_json)


def bench_streams(
    streams: Annotated[
        int, typer.Option("--streams", min=1, help="Simulated worker streams to connect.")
    ] = 10_000,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=0,
            help="Processes the streams are spread over; 0: one per 2,500, at least two.",
        ),
    ] = 0,
    per_connection: Annotated[
        int,
        typer.Option(
            "--per-connection",
            min=1,
            help="Streams sharing one HTTP/2 connection (1: each its own, as separate "
            "worker processes have).",
        ),
    ] = 1,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Probe tasks per second.")] = 50.0,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.1, help="Length of the probe run.")
    ] = 10.0,
    idle_seconds: Annotated[
        float,
        typer.Option(
            "--idle-seconds", min=0.1, help="Seconds the coordinator's idle CPU is read over."
        ),
    ] = 10.0,
    connect_timeout: Annotated[
        float,
        typer.Option("--connect-timeout", min=1.0, help="Seconds the streams get to connect."),
    ] = 60.0,
    dsn: Annotated[str | None, typer.Option("--dsn", help=DSN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure many worker streams on one coordinator: the time to connect them all, pickup
    latency at a light rate among them, the coordinator's CPU and memory (the target: 10,000
    streams within 10 s, pickup p99 under 20 ms)."""
    from conveyor.bench.streams import StreamsConfig, run

    config = StreamsConfig(
        streams=streams,
        processes=processes,
        per_connection=per_connection,
        rate=rate,
        seconds=seconds,
        idle_seconds=idle_seconds,
        connect_timeout=connect_timeout,
        dsn=dsn,
    )
    return _print_figures(asyncio.run(run(config)), as_json)


def bench_floor(
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Probes per second.")] = 100.0,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.1, help="Length of the probe run.")
    ] = 10.0,
    commit: Annotated[
        bool,
        typer.Option(
            "--commit", help="The relay commits a row per probe to a durable PostgreSQL first."
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="The client submits on one open stream, not a unary call each (an API "
            "Conveyor does not have: what it would take off).",
        ),
    ] = False,
    dsn: Annotated[
        str | None, typer.Option("--dsn", help="PostgreSQL for --commit; default: embedded.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    *,
    g: Globals,
) -> int:
    """Measure the floor under a pickup on this machine: a client's unary call, a relay
    (optionally committing a row) and a worker's open stream over loopback grpc.aio, with
    nothing of Conveyor in between. Compare its pickup with `conveyor bench`'s."""
    from conveyor.bench.floor import FloorConfig, report, run

    figures = asyncio.run(
        run(FloorConfig(rate=rate, seconds=seconds, commit=commit, stream=stream, dsn=dsn))
    )
    report(figures)
    return _print_figures(figures, as_json)
