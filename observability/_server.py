"""The HTTP endpoint Prometheus scrapes (``--metrics-listen HOST:PORT``).

A small HTTP/1.0 server, a daemon thread per request off the event loop: a scrape's work
(collecting, formatting, the queue depth query waiting on the loop) never runs on the
loop that serves gRPC. It serves ``/metrics`` (any path, like prometheus_client), with
OpenMetrics and gzip when the scraper asks for them. The usual text format is built by
:class:`~conveyor.observability._exposition.Exposition` (the same bytes as
prometheus_client's, a fraction of the CPU); the rest by prometheus_client's own WSGI app.

The server is not wsgiref's (which prometheus_client's ``start_wsgi_server`` uses): that
one copies the process environment into every request's environ, parses headers with
the email package and writes the response in pieces, some 0.65 ms of CPU a scrape, more
than a worker's whole page costs to build (docs/performance.md, "Issue 19: replicas and
scrapes"). This one reads the request line and headers, calls the same WSGI app with the
few environ keys it and prometheus_client's app read, and writes the answer in one send.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

from prometheus_client import exposition as pe
from prometheus_client.registry import CollectorRegistry

from conveyor.observability._exposition import Exposition

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]

__all__ = ["MetricsServer", "parse_listen"]

_log = logging.getLogger("conveyor.observability.metrics")

_MAX_LINE = 8192
"""The longest request or header line read (longer: 400)."""
_MAX_HEADERS = 100
_READ_TIMEOUT = 10.0
"""Seconds a client may take to send its request: a slow one holds only its own thread."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port).

    Raises ValueError naming what is wrong, for a clear ``--metrics-listen`` error.
    """
    host, sep, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    unbalanced = ("[" in host or "]" in host) and not bracketed
    if not sep or not port_text.isdigit() or unbalanced:
        raise ValueError(
            f"metrics listen address {value!r} is not HOST:PORT (for example 0.0.0.0:9464, "
            "or [::1]:9464)"
        )
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"metrics listen address {value!r}: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"metrics listen address {value!r}: {host!r} is not an IPv6 address"
            ) from None
    elif ":" in host:
        raise ValueError(f"metrics listen address {value!r}: write an IPv6 host as [{host}]")
    return host or "0.0.0.0", port


class MetricsServer:
    """Serves one registry over HTTP until :meth:`stop`.

    ``MetricsServer(registry, "127.0.0.1:0")`` picks a free port; :attr:`port` and
    :attr:`url` tell which once started.
    """

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self._registry = registry
        self._host, self._port = parse_listen(listen)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Binds and starts serving; raises OSError (with the address) when it cannot bind."""
        if self._server is not None:
            return
        try:
            server = _serve(self._host, self._port, metrics_app(self._registry))
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        self._port = int(server.server_address[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Stops serving and closes the socket; waits up to ``timeout`` for the thread.

        Blocking (it waits for the serving thread): from a coroutine, call it through
        ``asyncio.to_thread``.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return self._host

    @property
    def url(self) -> str:
        """The scrape URL (on loopback when bound to all interfaces)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}/metrics"


def metrics_app(registry: CollectorRegistry) -> _App:
    """The WSGI app of ``/metrics``: prometheus_client's, except that a GET of the usual
    text format is built by an :class:`Exposition` kept across scrapes."""
    fallback: _App = pe.make_wsgi_app(registry)
    exposition = Exposition(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        plain = (
            environ["REQUEST_METHOD"] == "GET"
            and environ.get("PATH_INFO") != "/favicon.ico"
            and "name[]" not in parse_qs(environ.get("QUERY_STRING", ""))
        )
        if plain:
            encoder, content_type = pe.choose_encoder(environ.get("HTTP_ACCEPT", ""))
            if encoder is pe.generate_latest:
                output = exposition.generate()
                headers = [("Content-Type", content_type)]
                if pe.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                    # Level 1: a few times cheaper than the default 9, and a page of
                    # repeated label sets compresses well at any level.
                    output = gzip.compress(output, compresslevel=1)
                    headers.append(("Content-Encoding", "gzip"))
                start_response("200 OK", headers)
                return [output]
        return fallback(environ, start_response)

    return app


class _Server(socketserver.ThreadingTCPServer):
    """A thread per request, never joined (daemon threads: a stuck scraper cannot hold up
    the process's exit), the address reusable at once after a restart."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: _App) -> None:
        self.app = app
        super().__init__(address, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    """One exchange: the request read, the app's answer written, the connection closed
    (HTTP/1.0, as wsgiref's server answers)."""

    timeout = _READ_TIMEOUT

    def handle(self) -> None:
        try:
            environ = self._read()
        except (OSError, UnicodeDecodeError):
            return  # the client went away or timed out: nobody to answer
        if environ is None:
            self._send("400 Bad Request", [], b"# HTTP 400: a malformed request\n")
            return
        answer: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: object = None
        ) -> None:
            answer[:] = [status, headers]

        app = self.server.app  # type: ignore[attr-defined]
        try:
            body = b"".join(app(environ, start_response))
        except Exception:
            _log.exception("the metrics page could not be built")
            self._send("500 Internal Server Error", [], b"# HTTP 500: see the process log\n")
            return
        status, headers = answer
        self._send(status, headers, body)

    def _read(self) -> dict[str, Any] | None:
        """The request as the WSGI environ keys the apps read; None when malformed."""
        line = self.rfile.readline(_MAX_LINE + 1)
        parts = line.decode("latin-1").split()
        if len(line) > _MAX_LINE or len(parts) != 3:
            return None
        method, target, protocol = parts
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            raw = self.rfile.readline(_MAX_LINE + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            if len(raw) > _MAX_LINE:
                return None
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            return None
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": protocol,
        }
        for name, key in (("accept", "HTTP_ACCEPT"), ("accept-encoding", "HTTP_ACCEPT_ENCODING")):
            if name in headers:
                environ[key] = headers[name]
        return environ

    def _send(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.wfile.write(
            f"HTTP/1.0 {status}\r\n{head}Content-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode("latin-1")
            + body
        )


def _serve(host: str, port: int, app: _App) -> _Server:
    """A server for ``app`` on the best address family for ``host``."""

    class Server(_Server):
        """A class per server: the address family is set on the class."""

    Server.address_family, addr = pe._get_best_family(host, port)  # type: ignore[no-untyped-call]
    return Server((addr, port), app)
