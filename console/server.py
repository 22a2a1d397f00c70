"""The console's web server: its configuration, and its start and stop on a running loop.

:class:`Console` serves on the event loop that starts it (aiohttp's ``AppRunner``, which
installs no signal handlers of its own), so ``conveyor dev`` runs it beside the
coordinator and the demo worker; ``conveyor console`` runs it alone. It binds its socket
itself: the port is known at once (port 0 included), and ``conveyor dev`` can move on to
the next port when the default one is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from aiohttp import web

from conveyor.client import AsyncClient
from conveyor.console import admin, auth, live, pages
from conveyor.console.sessions import SessionPolicy, SessionStore, SignInLinks, Throttle
from conveyor.console.web import HERE, STATE, ConsoleState, secure_headers
from conveyor.transport import ConnectionOptions
from conveyor.transport._encryption import PayloadCodec

__all__ = ["DEFAULT_LISTEN", "Console", "ConsoleConfig", "is_loopback", "parse_listen"]

logger = logging.getLogger("conveyor.console")

DEFAULT_LISTEN = "127.0.0.1:8080"
#: Seconds between sweeps that close the clients of expired sessions.
_SWEEP_INTERVAL = 30.0
# Failed sign-ins the console lets through to the coordinator: 10 at once, then one
# every 3 s, from all browsers together; the coordinator throttles an address only after
# 30 failures (refilled at 2/s), so the console's own address never is.
_SIGN_IN_RATE = 1 / 3
_SIGN_IN_BURST = 10


def parse_listen(listen: str) -> tuple[str, int]:
    """``("127.0.0.1", 8080)`` for ``127.0.0.1:8080`` (``[::1]:8080`` for IPv6).

    Raises:
        ValueError: Not ``HOST:PORT``, or the port is out of range.
    """
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as {DEFAULT_LISTEN}, got {listen!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConsoleConfig:
    """How a console reaches the coordinator and serves browsers."""

    #: The coordinator address(es), as the client takes them.
    coordinators: str | Sequence[str]
    #: ``HOST:PORT`` to serve on (port 0: any free port).
    listen: str = DEFAULT_LISTEN
    #: Transport settings to the coordinator (TLS credentials, metadata), without a key:
    #: each session adds its own.
    options: ConnectionOptions = field(default_factory=ConnectionOptions)
    #: Decrypts payloads and results for display (``--encryption-key-file``); without
    #: one, an encrypted payload shows as such.
    codec: PayloadCodec | None = None
    #: Seconds each call to the coordinator may take.
    rpc_timeout: float = 10.0
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    #: PEM certificate and key to serve HTTPS with (both or neither).
    https_cert: str = ""
    https_key: str = ""
    #: Rows per page of every list.
    page_size: int = 50
    #: Seconds between the polls behind the live queue and worker views.
    live_interval: float = 2.0
    #: Further ports to try, one after another, when ``listen``'s is taken (``conveyor
    #: dev``, whose default port may be busy); 0: fail at once.
    port_retries: int = 0

    def __post_init__(self) -> None:
        parse_listen(self.listen)
        if bool(self.https_cert) != bool(self.https_key):
            raise ValueError("HTTPS needs both a certificate and its key")
        if not 1 <= self.page_size <= 1000:
            raise ValueError(f"page_size must be 1 to 1000, got {self.page_size}")
        if self.live_interval <= 0 or self.rpc_timeout <= 0:
            raise ValueError("live_interval and rpc_timeout must be positive")


class Console:
    """The web console; ``async with Console(config) as console: ...`` or start and stop."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.state = ConsoleState(
            make_client=self._client,
            sessions=SessionStore(config.sessions),
            links=SignInLinks(),
            sign_in_throttle=Throttle(_SIGN_IN_RATE, _SIGN_IN_BURST),
            page_size=config.page_size,
            live_interval=config.live_interval,
        )
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None

    def _client(self, api_key: str | None) -> AsyncClient:
        # Exactly the session's key, or none: never one from the console's environment.
        options = dataclasses.replace(self.config.options, api_key=None, find_api_key=False)
        return AsyncClient(
            self.config.coordinators,
            timeout=self.config.rpc_timeout,
            options=ConnectionOptions.merge(options, api_key=api_key or None),
            codec=self.config.codec,
        )

    @property
    def url(self) -> str:
        """Where browsers reach it (``http://127.0.0.1:8080``); once started."""
        if self._address is None:
            raise RuntimeError("the console is not started")
        host, port = self._address
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.config.https_cert else "http"
        return f"{scheme}://{shown}:{port}"

    def sign_in_link(self, api_key: str | None) -> str:
        """A one-time link that signs a browser in with ``api_key`` (see SignInLinks)."""
        return f"{self.url}/sign-in?token={self.state.links.issue(api_key)}"

    def application(self) -> web.Application:
        """The aiohttp application (its routes, headers and shutdown)."""
        app = web.Application()
        app[STATE] = self.state
        app.add_routes([*auth.routes(), *pages.routes(), *admin.routes(), *live.routes()])
        app.router.add_static("/static", HERE / "static", follow_symlinks=False)
        app.on_response_prepare.append(_headers)
        app.on_shutdown.append(self._end_streams)
        return app

    async def start(self) -> None:
        """Binds and serves.

        Raises:
            OSError: The address cannot be bound (in use, not this machine's, ...).
            TLSConfigError: The HTTPS certificate or key is unusable.
        """
        ssl_context = self._ssl_context()
        sock = self._bind()
        runner = web.AppRunner(
            self.application(),
            # Handlers end when their browser leaves (a live stream would otherwise wait
            # for its next write to notice); no access log: sign-in links carry tokens.
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        try:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        self._sweeper = asyncio.create_task(self._sweep(), name="console session sweeper")
        logger.info("console serving on %s", self.url)

    def _bind(self) -> socket.socket:
        host, port = parse_listen(self.config.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        last: OSError | None = None
        for attempt in range(self.config.port_retries + 1):
            try:
                sock = socket.create_server((host, port + attempt if port else 0), family=family)
            except OSError as exc:
                last = exc
                if exc.errno != errno.EADDRINUSE or not port:
                    raise
                continue
            sock.setblocking(False)
            name = sock.getsockname()
            self._address = (name[0], name[1])
            return sock
        assert last is not None
        raise last

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.https_cert:
            return None
        from conveyor.transport._tls import ServerTLS

        # Checked as the coordinator's own files are: one line naming what is wrong.
        ServerTLS(self.config.https_cert, self.config.https_key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.https_cert, self.config.https_key)
        return context

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            await self.state.close_clients(self.state.sessions.expired())

    async def _end_streams(self, app: web.Application) -> None:
        for stream in list(self.state.streams):
            stream.cancel()

    async def stop(self) -> None:
        """Stops serving, ends the live streams and closes every session's client."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.state.close_clients(self.state.sessions.clear())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    secure_headers(response)
    if request.path.startswith("/static/"):
        # The files change only with the package; the vendored ones carry their version.
        response.headers["Cache-Control"] = "public, max-age=3600"
