"""``conveyor coordinator`` and ``conveyor worker``: the long-running processes."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.cli import security, values
from conveyor.cli.app import Globals, command
from conveyor.cli.errors import USAGE, CLIError

if TYPE_CHECKING:
    from conveyor.cli.autoscale import Autoscale
    from conveyor.coordinator import CoordinatorConfig
    from conveyor.worker import Worker

DEFAULT_LISTEN = "127.0.0.1:50051"
METRICS_ENV = "CONVEYOR_METRICS_LISTEN"


def register(app: typer.Typer) -> None:
    command(
        app,
        "coordinator",
        example=[
            "conveyor coordinator --dsn postgresql://conveyor@db.internal/conveyor",
            'conveyor coordinator --dsn "$DSN" --etcd http://10.0.0.1:2379 '
            "--listen 0.0.0.0:50051 --advertise 10.0.0.5:50051",
            'conveyor coordinator --dsn "$DSN" --metrics-listen 0.0.0.0:9464',
        ],
    )(coordinator)
    command(
        app,
        "worker",
        example=[
            "conveyor worker myapp.tasks:worker",
            "conveyor worker --demo --coordinator 127.0.0.1:50051",
            "conveyor worker myapp.tasks --queues mail,default --concurrency 50 --grace-period 60",
            "conveyor worker myapp.tasks:worker --metrics-listen 0.0.0.0:9465",
            "conveyor worker myapp.tasks --autoscale 1:8 --concurrency 20",
        ],
    )(worker)


def check_listen(listen: str) -> None:
    """Fails in one line when ``listen`` is malformed or its port is taken.

    Checked before anything starts (PostgreSQL takes seconds); the coordinator's own bind
    still decides, and its failure is worded the same way.
    """
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port < 65536:
        raise CLIError(f"--listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:50051)", code=USAGE)
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC does: a port whose old connections linger in TIME_WAIT is usable.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CLIError(busy_port_message(listen, exc)) from None


def check_metrics_listen(value: str, flag: str = "--metrics-listen") -> None:
    """Fails in one line when the metrics address is malformed or its port is taken."""
    from conveyor.observability.metrics import parse_listen

    try:
        host, port = parse_listen(value)
    except ValueError as exc:
        raise CLIError(f"{flag}: {exc}", code=USAGE) from None
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As prometheus_client's server does (it sets SO_REUSEADDR).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = (
                "the address is in use"
                if exc.errno == errno.EADDRINUSE
                else exc.strerror or str(exc)
            )
            raise CLIError(
                f"cannot serve metrics on {value}: {why}; pick another with {flag} HOST:PORT"
            ) from None


def metrics_option(help: str, envvar: str | None = METRICS_ENV) -> typer.models.OptionInfo:
    """The ``--metrics-listen`` option (off unless given)."""
    info: typer.models.OptionInfo = typer.Option(
        "--metrics-listen", envvar=envvar, metavar="HOST:PORT", help=help
    )
    return info


def busy_port_message(listen: str, exc: BaseException | None = None) -> str:
    """One line for an address the coordinator cannot listen on."""
    in_use = (
        exc is None
        or (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE)
        or is_bind_failure(exc)
    )
    why = "the address is in use (another conveyor dev or coordinator?)" if in_use else str(exc)
    return f"cannot listen on {listen}: {why}; pick another with --listen HOST:PORT"


def is_bind_failure(exc: BaseException) -> bool:
    """Whether the coordinator failed to start because it could not bind its address
    (gRPC raises RuntimeError "Failed to bind", older versions returned port 0)."""
    text = str(exc)
    return isinstance(exc, OSError | RuntimeError) and (
        "bind" in text.lower() or "address is in use" in text
    )


def coordinator(
    dsn: Annotated[
        str | None,
        typer.Option("--dsn", envvar="CONVEYOR_DSN", help="PostgreSQL connection string."),
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen", envvar="CONVEYOR_LISTEN", metavar="HOST:PORT", help="Where to serve gRPC."
        ),
    ] = DEFAULT_LISTEN,
    etcd: Annotated[
        str,
        typer.Option(
            "--etcd",
            envvar="CONVEYOR_ETCD",
            metavar="URL[,URL]",
            help="etcd endpoints for leader election; none: single-node (leads alone).",
        ),
    ] = "",
    advertise: Annotated[
        str,
        typer.Option(
            "--advertise",
            envvar="CONVEYOR_ADVERTISE",
            metavar="HOST:PORT",
            help="Address other processes reach this coordinator at (default: --listen).",
        ),
    ] = "",
    cluster: Annotated[
        str, typer.Option("--cluster", help="Cluster name (one leader per cluster).")
    ] = "default",
    election_ttl: Annotated[
        float,
        typer.Option(
            "--election-ttl",
            metavar="DURATION",
            parser=values.seconds(),
            help="How long a dead leader keeps office.",
        ),
    ] = 2.0,
    lease_duration: Annotated[
        float,
        typer.Option(
            "--lease-duration",
            metavar="DURATION",
            parser=values.seconds(),
            help="A task's lease without heartbeats.",
        ),
    ] = 30.0,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            "--heartbeat-interval",
            metavar="DURATION",
            parser=values.seconds(),
            help="Between worker heartbeats.",
        ),
    ] = 10.0,
    liveness_timeout: Annotated[
        float,
        typer.Option(
            "--liveness-timeout",
            metavar="DURATION",
            parser=values.seconds(0.0),
            help="Silence after which a worker is evicted (and a worker gives up on the "
            "coordinator); 0: the lease duration minus one heartbeat interval.",
        ),
    ] = 0.0,
    max_worker_loop_lag: Annotated[
        float,
        typer.Option(
            "--max-worker-loop-lag",
            metavar="SECONDS",
            help="Event-loop lag (from heartbeats) past which a worker is assigned nothing "
            "until it recovers; 0: no limit.",
        ),
    ] = 1.0,
    max_payload_bytes: Annotated[
        int, typer.Option("--max-payload-bytes", help="Largest task payload accepted.")
    ] = 1 << 20,
    max_backlog: Annotated[
        int,
        typer.Option(
            "--max-backlog",
            metavar="TASKS",
            help="Unfinished tasks past which a tenant's submits are refused "
            "(RESOURCE_EXHAUSTED), unless its own limit says otherwise; 0: no limit.",
        ),
    ] = 0,
    max_queue_backlog: Annotated[
        int,
        typer.Option(
            "--max-queue-backlog",
            metavar="TASKS",
            help="Unfinished tasks past which submits to one queue of a tenant are refused "
            "(RESOURCE_EXHAUSTED, with RetryInfo); 0: no limit.",
        ),
    ] = 0,
    pool_size: Annotated[
        int, typer.Option("--pool-size", help="Most PostgreSQL connections.")
    ] = 16,
    retention_days: Annotated[
        float,
        typer.Option(
            "--retention-days",
            metavar="DAYS",
            help="Delete finished tasks (succeeded, dead, cancelled) this many days after "
            "they finished; 0: keep them until deleted (conveyor purge).",
        ),
    ] = 0.0,
    metrics_listen: Annotated[
        str,
        metrics_option("Serve Prometheus metrics on HOST:PORT (/metrics); none by default."),
    ] = "",
    tls_client_ca: Annotated[
        str | None,
        typer.Option(
            "--tls-client-ca",
            envvar="CONVEYOR_TLS_CLIENT_CA",
            metavar="FILE",
            help="Require client certificates issued by these PEM certificates (mutual "
            "TLS; needs --tls-cert and --tls-key, this coordinator's certificate).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Turn authentication off: anyone who reaches the port acts as tenant "
            "'default' with every scope. For local experiments only.",
        ),
    ] = False,
    bootstrap_key_file: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-key-file",
            envvar="CONVEYOR_BOOTSTRAP_KEY_FILE",
            metavar="PATH",
            help="A file holding an API key to add as an admin key with every scope, unless "
            "its id exists (also: CONVEYOR_BOOTSTRAP_KEY; make one with conveyor keys "
            "generate).",
        ),
    ] = None,
    submit_rate: Annotated[
        float,
        typer.Option("--submit-rate", min=0, help="Default tenant limit: tasks submitted per s."),
    ] = 0.0,
    submit_burst: Annotated[
        int, typer.Option("--submit-burst", min=0, help="Default tenant limit: burst.")
    ] = 0,
    max_schedules: Annotated[
        int, typer.Option("--max-schedules", min=0, help="Default tenant limit: schedules.")
    ] = 0,
    breaker_failure_rate: Annotated[
        float,
        typer.Option(
            "--breaker-failure-rate",
            help="Circuit breakers: stop dispatching a task type whose attempts fail at this "
            "rate (0 to 1) over the last minute; 0: no breakers.",
        ),
    ] = 0.0,
    breaker_min_requests: Annotated[
        int,
        typer.Option("--breaker-min-requests", help="Attempts a breaker needs before it opens."),
    ] = 20,
    breaker_cooldown: Annotated[
        float,
        typer.Option("--breaker-cooldown", help="Seconds an open breaker waits before probes."),
    ] = 30.0,
    aging_interval: Annotated[
        float,
        typer.Option(
            "--aging-interval",
            help="Aging: a waiting task's priority counts one more per this many seconds "
            "(at most --aging-max more); 0: no aging.",
        ),
    ] = 0.0,
    aging_max: Annotated[
        int, typer.Option("--aging-max", help="The most aging adds to a task's priority.")
    ] = 10,
    max_watch_streams: Annotated[
        int,
        typer.Option(
            "--max-watch-streams",
            min=0,
            help="WatchTask streams each tenant may have open on this coordinator (0: no limit).",
        ),
    ] = 1000,
    auth_failure_burst: Annotated[
        int,
        typer.Option(
            "--auth-failure-burst",
            min=0,
            help="Failed authentications a peer address may have in a row before its calls "
            "are refused for a while (0: no limit; behind a proxy every caller shares one).",
        ),
    ] = 30,
    auth_failure_rate: Annotated[
        float,
        typer.Option("--auth-failure-rate", min=0, help="...and how many a second it regains."),
    ] = 2.0,
    webhook_allow_private: Annotated[
        bool,
        typer.Option(
            "--webhook-allow-private",
            envvar="CONVEYOR_WEBHOOK_ALLOW_PRIVATE",
            help="Let webhooks go to loopback, private and link-local addresses and over "
            "plain http (default: public addresses over https only).",
        ),
    ] = False,
    webhook_retry_for: Annotated[
        float,
        typer.Option(
            "--webhook-retry-for",
            metavar="SECONDS",
            help="How long a webhook event is retried before it is marked failed.",
        ),
    ] = 86_400.0,
    *,
    g: Globals,
) -> int:
    """Run a coordinator against your PostgreSQL (and etcd, for several replicas).

    With OTEL_EXPORTER_OTLP_ENDPOINT set it sends traces there (OTLP/gRPC).
    With --tls-cert and --tls-key it serves TLS (renewed files are picked up without a
    restart); with --tls-client-ca too, every client and worker must present a
    certificate (mutual TLS).

    Every call needs an API key (see conveyor keys); --insecure turns that off. Tenant
    limits given here are every tenant's defaults (0: no limit); conveyor tenants set
    overrides them per tenant.
    """
    from conveyor.coordinator.config import ConfigError

    config = coordinator_config(
        dsn=dsn,
        listen=listen,
        etcd=etcd,
        advertise=advertise,
        cluster=cluster,
        election_ttl=election_ttl,
        lease_duration=lease_duration,
        heartbeat_interval=heartbeat_interval,
        liveness_timeout=liveness_timeout,
        max_worker_loop_lag=max_worker_loop_lag,
        max_payload_bytes=max_payload_bytes,
        max_backlog=max_backlog,
        max_queue_backlog=max_queue_backlog,
        pool_size=pool_size,
        retention_days=retention_days,
        metrics_listen=metrics_listen,
        tls_cert=g.tls_cert,
        tls_key=g.tls_key,
        tls_client_ca=tls_client_ca,
        authentication=not insecure,
        bootstrap_key=bootstrap_key(bootstrap_key_file),
        submit_rate=submit_rate,
        submit_burst=submit_burst,
        max_schedules=max_schedules,
        max_watch_streams=max_watch_streams,
        auth_failure_burst=auth_failure_burst,
        auth_failure_rate=auth_failure_rate,
        breaker_failure_rate=breaker_failure_rate,
        breaker_min_requests=breaker_min_requests,
        breaker_cooldown=breaker_cooldown,
        aging_interval=aging_interval,
        aging_max=aging_max,
        webhook_allow_private=webhook_allow_private,
        webhook_retry_for=webhook_retry_for,
    )
    check_listen(listen)
    if metrics_listen:
        check_metrics_listen(metrics_listen)
    from conveyor.coordinator import serve
    from conveyor.coordinator.api.tls import server_tls

    server_tls(config)  # a bad TLS file fails here, in one line, before anything starts

    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError) as exc:
        if is_bind_failure(exc):
            raise CLIError(busy_port_message(listen, exc)) from None
        raise
    except ConfigError as exc:  # found at start (a bootstrap key whose id is taken)
        raise CLIError(str(exc)) from None
    return 0


def bootstrap_key(path: str | None) -> str:
    """The bootstrap key: from ``--bootstrap-key-file``, else ``CONVEYOR_BOOTSTRAP_KEY``."""
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise CLIError(
                f"--bootstrap-key-file {path}: cannot read it ({exc.strerror})", code=USAGE
            ) from None
    return os.environ.get("CONVEYOR_BOOTSTRAP_KEY", "").strip()


def coordinator_config(
    *,
    dsn: str | None,
    listen: str,
    etcd: str,
    advertise: str,
    cluster: str,
    election_ttl: float,
    lease_duration: float,
    heartbeat_interval: float,
    max_payload_bytes: int,
    pool_size: int,
    liveness_timeout: float = 0.0,
    max_worker_loop_lag: float = 1.0,
    max_backlog: int = 0,
    max_queue_backlog: int = 0,
    retention_days: float = 0.0,
    metrics_listen: str = "",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    authentication: bool = True,
    bootstrap_key: str = "",
    submit_rate: float = 0.0,
    submit_burst: int = 0,
    max_schedules: int = 0,
    max_watch_streams: int = 1000,
    auth_failure_burst: int = 30,
    auth_failure_rate: float = 2.0,
    breaker_failure_rate: float = 0.0,
    breaker_min_requests: int = 20,
    breaker_cooldown: float = 30.0,
    aging_interval: float = 0.0,
    aging_max: int = 10,
    webhook_allow_private: bool = False,
    webhook_retry_for: float = 86_400.0,
) -> CoordinatorConfig:
    """The coordinator's configuration from its flags; a bad value is a one-line error.

    The rules are CoordinatorConfig's own; its message names settings, which map to the
    flags by their dashed names."""
    from conveyor.coordinator import CoordinatorConfig
    from conveyor.coordinator.leader.election import parse_endpoints

    if not dsn:
        raise CLIError("no database: pass --dsn postgresql://... or set CONVEYOR_DSN", code=USAGE)
    if pool_size < 1:
        raise CLIError("--pool-size must be at least 1", code=USAGE)
    try:
        endpoints = tuple(parse_endpoints(etcd)) if etcd else ()
    except ValueError as exc:
        raise CLIError(f"--etcd: {exc}", code=USAGE) from None
    try:
        return CoordinatorConfig(
            dsn=dsn,
            listen=listen,
            cluster=cluster,
            etcd=tuple(f"http://{host}:{port}" for host, port in endpoints),
            advertise=advertise,
            election_ttl=election_ttl,
            lease_duration=lease_duration,
            heartbeat_interval=heartbeat_interval,
            liveness_timeout=liveness_timeout,
            max_worker_loop_lag=max_worker_loop_lag,
            max_payload_bytes=max_payload_bytes,
            max_backlog=max_backlog,
            max_queue_backlog=max_queue_backlog,
            retention_days=retention_days,
            pool_max_size=pool_size,
            pool_min_size=min(4, pool_size),
            metrics_listen=metrics_listen,
            tls_cert_file=tls_cert or "",
            tls_key_file=tls_key or "",
            tls_client_ca_file=tls_client_ca or "",
            authentication=authentication,
            bootstrap_key=bootstrap_key,
            submit_rate=submit_rate,
            submit_burst=submit_burst,
            max_schedules=max_schedules,
            max_watch_streams=max_watch_streams,
            auth_failure_burst=auth_failure_burst,
            auth_failure_rate=auth_failure_rate,
            breaker_failure_rate=breaker_failure_rate,
            breaker_min_requests=breaker_min_requests,
            breaker_cooldown=breaker_cooldown,
            aging_interval=aging_interval,
            aging_max=aging_max,
            webhook_allow_private=webhook_allow_private,
            webhook_retry_for=webhook_retry_for,
        )
    except ValueError as exc:  # the configuration's own checks, in terms of the flags
        raise CLIError(_in_flag_terms(str(exc)), code=USAGE) from None


_FLAG_SETTINGS = (
    "election_ttl", "lease_duration", "heartbeat_interval", "liveness_timeout",
    "max_payload_bytes", "max_backlog", "metrics_listen", "submit_rate", "submit_burst",
    "max_schedules", "auth_failure_burst", "auth_failure_rate", "max_watch_streams",
    "breaker_failure_rate", "breaker_min_requests", "breaker_cooldown", "aging_interval",
    "aging_max", "retention_days", "max_queue_backlog", "webhook_retry_for",
    "max_worker_loop_lag",
)  # fmt: skip


def _in_flag_terms(message: str) -> str:
    """CoordinatorConfig names its settings (``lease_duration``); the CLI user knows them
    as flags (``--lease-duration``)."""
    for name in _FLAG_SETTINGS:
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message


def _autoscale_seconds(flag: str, help: str) -> typer.models.OptionInfo:
    option: typer.models.OptionInfo = typer.Option(
        flag, metavar="SECONDS", help=f"With --autoscale: {help}"
    )
    return option


def worker(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="MODULE[:ATTR]",
            help="The conveyor.worker.Worker to run (ATTR defaults to 'worker').",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Serve the demo types echo, sleep and fail.")
    ] = False,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", help="Tasks run at once (overrides the worker's own)."),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option("--queues", help="Comma-separated queues (overrides the worker's own)."),
    ] = None,
    grace_period: Annotated[
        float | None,
        typer.Option(
            "--grace-period",
            metavar="DURATION",
            parser=values.seconds(0.0),
            help="On SIGTERM or Ctrl-C, how long running tasks may finish (default 30).",
        ),
    ] = None,
    metrics_listen: Annotated[
        str,
        metrics_option(
            "Serve this worker's Prometheus metrics on HOST:PORT (/metrics); none by default."
        ),
    ] = "",
    autoscale: Annotated[
        str | None,
        typer.Option(
            "--autoscale",
            metavar="MIN:MAX",
            help="Run MIN to MAX worker processes, sized by the queues' backlog and pickup "
            "latency, restarting any that dies.",
            show_default=False,
        ),
    ] = None,
    autoscale_interval: Annotated[
        float, _autoscale_seconds("--autoscale-interval", "seconds between looks at the load.")
    ] = 5.0,
    autoscale_cooldown: Annotated[
        float,
        _autoscale_seconds(
            "--autoscale-cooldown",
            "seconds the load must stay low before a process is drained (one at a time).",
        ),
    ] = 60.0,
    autoscale_latency: Annotated[
        float,
        _autoscale_seconds(
            "--autoscale-latency",
            "one more process while the oldest ready task has waited longer than this.",
        ),
    ] = 5.0,
    *,
    g: Globals,
) -> int:
    """Run a worker process (or, with --autoscale, several).

    SIGTERM or Ctrl-C drains it: no new work, running tasks get the grace period to finish
    (a task still running then goes back to its queue), then it exits 0. A second signal
    stops at once. With OTEL_EXPORTER_OTLP_ENDPOINT set it sends traces there (OTLP/gRPC).

    --autoscale MIN:MAX runs a supervisor instead: it starts MIN worker processes (this
    same command), adds some at once when the queues' backlog (pending plus running
    tasks, per --concurrency) or the wait of the oldest ready task asks for them, drains
    one at a time once the load stayed low for --autoscale-cooldown, and restarts a
    process that dies, with backoff. SIGTERM drains them all.
    """
    built = build_worker(
        g,
        target=target,
        demo=demo,
        concurrency=concurrency,
        queues=queues,
        grace=grace_period,
        metrics_listen=metrics_listen,
    )
    if metrics_listen:
        check_metrics_listen(metrics_listen)
    if autoscale is not None:
        from conveyor.cli import autoscale as supervisor

        if not os.environ.get(supervisor.CHILD_ENV):  # else: one of its worker processes
            flags = _autoscale_flags(
                autoscale, autoscale_interval, autoscale_cooldown, autoscale_latency,
                metrics_listen,
            )  # fmt: skip
            return supervisor.run(
                g,
                flags,
                concurrency=built.concurrency,
                queues=built.queues,
                types=built.task_types,
            )
    built.run_sync()
    return 0


def _autoscale_flags(
    spec: str, interval: float, cooldown: float, latency: float, metrics_listen: str
) -> Autoscale:
    from conveyor.cli.autoscale import Autoscale, parse_range

    if metrics_listen:
        raise CLIError(
            "--metrics-listen serves one process's metrics: with --autoscale the worker "
            "processes would share its port; leave it out",
            code=USAGE,
        )
    try:
        minimum, maximum = parse_range(spec)
    except ValueError as exc:
        raise CLIError(str(exc), code=USAGE) from None
    for flag, value in (("--autoscale-interval", interval), ("--autoscale-cooldown", cooldown),
                        ("--autoscale-latency", latency)):  # fmt: skip
        if not (0 < value < 86_400):
            raise CLIError(f"{flag} must be a number of seconds above 0, got {value}", code=USAGE)
    return Autoscale(minimum, maximum, interval, cooldown, latency)


def build_worker(
    g: Globals,
    *,
    target: str | None,
    demo: bool,
    concurrency: int | None,
    queues: str | None,
    grace: float | None,
    metrics_listen: str = "",
) -> Worker:
    """The worker to run: the demo one, or the user's with the flags applied."""
    from conveyor.worker import Worker, load_worker
    from conveyor.worker.demo import register_demo_tasks

    queue_names = None
    if queues is not None:
        queue_names = tuple(q.strip() for q in queues.split(",") if q.strip())
        if not queue_names:
            raise CLIError("--queues names no queue; e.g. --queues default,mail", code=USAGE)
    if demo and target:
        raise CLIError("give either MODULE[:ATTR] or --demo, not both", code=USAGE)
    if demo:
        built = register_demo_tasks(Worker(g.coordinator))
    elif target:
        built = load_worker(target)
    else:
        raise CLIError("name the worker to run (MODULE[:ATTR]) or pass --demo", code=USAGE)
    try:
        built.configure(
            coordinators=g.coordinator,
            concurrency=concurrency,
            queues=queue_names,
            grace_period=grace,
            metrics_listen=metrics_listen or None,
            credentials=security.channel_credentials(g),
            codec=security.payload_codec(g),
            api_key=g.api_key or None,
        )
    except ValueError as exc:
        raise CLIError(str(exc), code=USAGE) from None
    return built
