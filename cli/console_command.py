"""``conveyor console``: the web console, served until Ctrl-C (see :mod:`conveyor.console`).

It reaches the coordinator as every command does (``--coordinator``, and the TLS flags of
``cli/security.py``: ``--tls-ca`` to trust it, ``--tls-cert``/``--tls-key`` as this
client's certificate). It holds no key of its own: each person signs in with theirs.
Given ``--api-key`` (or ``CONVEYOR_API_KEY``), it prints a one-time sign-in link for that
key, as ``conveyor dev`` does for its admin key.

It listens on loopback unless told otherwise. Serving another address in plain HTTP
would carry API keys and session cookies in clear, so that needs ``--https-cert`` and
``--https-key``, or ``--allow-plain-http`` (behind a TLS proxy on another machine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.cli import security
from conveyor.cli.app import Globals, command
from conveyor.cli.errors import USAGE, CLIError

if TYPE_CHECKING:
    from conveyor.console import ConsoleConfig

__all__ = ["console_config", "register"]


def register(app: typer.Typer) -> None:
    command(
        app,
        "console",
        example=[
            "conveyor console",
            "conveyor console --coordinator 10.0.0.5:50051 --tls-ca ca.pem --listen 127.0.0.1:9000",
            "conveyor console --listen 0.0.0.0:8443 --https-cert web.pem --https-key web.key",
        ],
    )(console)


def console(
    listen: Annotated[
        str,
        typer.Option("--listen", metavar="HOST:PORT", help="Where browsers reach the console."),
    ] = "127.0.0.1:8080",
    https_cert: Annotated[
        str | None,
        typer.Option("--https-cert", metavar="FILE", help="Serve HTTPS with this certificate."),
    ] = None,
    https_key: Annotated[
        str | None,
        typer.Option("--https-key", metavar="FILE", help="The private key of --https-cert."),
    ] = None,
    allow_plain_http: Annotated[
        bool,
        typer.Option(
            "--allow-plain-http",
            help="Serve plain HTTP on an address other machines reach (behind a TLS proxy).",
        ),
    ] = False,
    *,
    g: Globals,
) -> int:
    """Serve the web console: queues, tasks, dead letters, schedules, workers, admin.

    Each person signs in with their own API key, which stays on this server; they see and
    may do what the key allows through the API. With --api-key (or CONVEYOR_API_KEY) a
    one-time sign-in link for that key is printed. Stops on Ctrl-C.
    """
    config = console_config(
        g, listen, https_cert=https_cert, https_key=https_key, allow_plain_http=allow_plain_http
    )
    return asyncio.run(_serve(config, g.api_key))


def console_config(
    g: Globals,
    listen: str,
    *,
    https_cert: str | None = None,
    https_key: str | None = None,
    allow_plain_http: bool = False,
) -> ConsoleConfig:
    """The console's configuration from the command line; one line for what is wrong."""
    from conveyor.console import ConsoleConfig
    from conveyor.console.server import is_loopback, parse_listen

    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        raise CLIError(f"--listen: {exc}", code=USAGE) from None
    if bool(https_cert) != bool(https_key):
        raise CLIError("HTTPS needs both --https-cert and --https-key", code=USAGE)
    if not https_cert and not is_loopback(host) and not allow_plain_http:
        raise CLIError(
            f"--listen {listen} is reachable from other machines, and plain HTTP would carry "
            "API keys and session cookies in clear: give --https-cert and --https-key, or "
            "--allow-plain-http behind a TLS proxy",
            code=USAGE,
        )
    return ConsoleConfig(
        coordinators=g.addresses,
        listen=listen,
        # The CLI's own meaning of the TLS flags, without the key: each session has its own.
        options=dataclasses.replace(g.options(), api_key=None),
        codec=security.payload_codec(g),
        rpc_timeout=g.rpc_timeout,
        https_cert=https_cert or "",
        https_key=https_key or "",
    )


async def _serve(config: ConsoleConfig, api_key: str | None) -> int:
    from conveyor.console import Console

    console = Console(config)
    try:
        await console.start()
    except OSError as exc:
        why = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise CLIError(
            f"cannot listen on {config.listen}: {why}; pick another with --listen HOST:PORT"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        where = config.coordinators
        coordinators = where if isinstance(where, str) else ",".join(where)
        print(f"Conveyor console on {console.url}/ (coordinator {coordinators})", flush=True)
        if api_key:
            print(f"  sign in: {console.sign_in_link(api_key)}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await console.stop()
    print("stopped.", flush=True)
    return 0
