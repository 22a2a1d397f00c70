"""The HTTP endpoint Prometheus scrapes (``--metrics-listen HOST:PORT``).

prometheus_client's WSGI server, in daemon threads off the event loop: a scrape's work
(collecting, formatting, the queue depth query waiting on the loop) never runs on the
loop that serves gRPC. It serves ``/metrics`` (any path, like prometheus_client), with
OpenMetrics and gzip when the scraper asks for them. The usual text format is built by
:class:`~conveyor.observability._exposition.Exposition` (the same bytes as
prometheus_client's, a fraction of the CPU); the rest by prometheus_client's own app.
"""

from __future__ import annotations

import gzip
import ipaddress
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import exposition as pe
from prometheus_client.registry import CollectorRegistry

from conveyor.observability._exposition import Exposition

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]

__all__ = ["MetricsServer", "parse_listen"]


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
        self._server: WSGIServer | None = None
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
        self._port = server.server_port

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


def _serve(host: str, port: int, app: _App) -> WSGIServer:
    """prometheus_client's ``start_wsgi_server`` without TLS, serving ``app``."""

    class Server(pe.ThreadingWSGIServer):
        """A class per server: the address family is set on the class."""

    Server.address_family, addr = pe._get_best_family(host, port)  # type: ignore[no-untyped-call]
    return make_server(addr, port, app, Server, handler_class=pe._SilentHandler)
