"""How the client and the worker reach a coordinator: one :class:`ConnectionOptions`.

Every channel either of them opens is made by :meth:`ConnectionOptions.open_channel`, so
transport security, credentials, call metadata, message limits, keepalive and client
interceptors are decided in this one place (TLS and API keys, tracing interceptors and
the like plug in here).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

__all__ = [
    "API_KEY_ENV",
    "MAX_MESSAGE_BYTES",
    "WORKER_CONNECT_TIMEOUT",
    "ClientInterceptor",
    "ConnectionOptions",
]

#: Where the client and the worker read an API key that neither ``api_key=`` nor ``options``
#: gives.
API_KEY_ENV = "CONVEYOR_API_KEY"

#: The coordinator's send and receive limit for one gRPC message; the SDK uses the same.
MAX_MESSAGE_BYTES = 64 << 20

#: The worker's connection attempt when its options set none (seconds). A worker opens a
#: fresh channel for every session, so with the client's default every attempt of a
#: fleet reconnecting at once would get 0.2 s, and a coordinator busy accepting thousands
#: answers slower than that (issue 19: at 10,000 streams on the 2-core VM, 6,800 attempts
#: timed out "before receiving SETTINGS" with 0.2-1 s, and 4,800 with 2 s; none with
#: 20 s). A worker that waits this long on a paused or black-holed coordinator before
#: trying the next one loses little: it noticed the loss after its liveness timeout
#: (20 s). Clients keep the short default: a submit must move on from a paused
#: coordinator fast.
WORKER_CONNECT_TIMEOUT = 5.0

#: Any of grpc.aio's four client interceptor kinds (their common base).
ClientInterceptor = aio.ClientInterceptor


#: HTTP/2 flow control on every connection of the SDKs and the coordinator: a fixed window
#: (per stream, announced in the connection's SETTINGS) in place of gRPC's BDP probing.
#: The probe sends a PING with the first data each side receives, and again as data keeps
#: coming (a heartbeat, an assignment), so every new connection cost each side more
#: writes, reads and wake-ups (issue 19, sixth round: at 10,000 worker streams, per
#: stream, both sides together: 36 fewer system calls of 245, 15 fewer context switches
#: of 36). An 8 MiB window moves a 16 MiB message over a 20 ms round trip about as fast as
#: the probe's did (0.08-0.09 s up or down, against 0.05-0.13 s; gRPC's window without
#: the probe, 64 KiB: 0.4 s). It bounds what a peer may send on a stream before it is
#: read, well under the 64 MiB one message may be anyway.
FLOW_CONTROL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 8 << 20),
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionOptions:
    """Transport settings shared by :class:`~conveyor.client.AsyncClient`,
    :class:`~conveyor.client.Client` and :class:`~conveyor.worker.Worker`.

    The defaults suit a coordinator reached over a local network in plaintext.
    """

    #: Channel credentials for TLS (``grpc.ssl_channel_credentials(...)``); plaintext
    #: when ``None``.
    credentials: grpc.ChannelCredentials | None = None
    #: Sent as ``authorization: Bearer <api_key>`` with every call and stream.
    api_key: str | None = None
    #: Whether :meth:`merge` may look up a key that nobody gave (``CONVEYOR_API_KEY``).
    #: False in a process that calls with other people's keys (the console): a session
    #: signed in without one must not borrow the process's own.
    find_api_key: bool = True
    #: Further metadata sent with every call and stream, as ``(key, value)`` pairs.
    metadata: tuple[tuple[str, str], ...] = ()
    #: grpc.aio client interceptors, outermost first, on every channel (for example
    #: OpenTelemetry's ``aio_client_interceptors()``). grpc.aio files each object under
    #: the first interceptor kind it implements, so give one object per kind.
    interceptors: tuple[ClientInterceptor, ...] = ()
    #: Largest message sent or received, in bytes: the coordinator's own limit, so a batch
    #: the coordinator may send always fits.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: Seconds between HTTP/2 keepalive pings while a call is open, so that a peer that
    #: died without closing the connection (a host gone, a partition) is noticed even on
    #: a quiet stream; ``None`` turns pings off. The coordinator must allow pings this
    #: often (gRPC servers refuse pings more often than every 5 minutes by default).
    keepalive_interval: float | None = 30.0
    #: Seconds to wait for a ping's answer before the connection is declared dead.
    keepalive_timeout: float = 10.0
    #: Cap on gRPC's own reconnect backoff, in seconds. gRPC's default grows to 120 s, which
    #: would leave a restarted coordinator unused for minutes.
    reconnect_backoff_max: float = 1.0
    #: Seconds one connection attempt (TCP connect and the HTTP/2 handshake, up to the
    #: server's SETTINGS frame) may take before it counts as failed and is retried after
    #: the backoff. ``None``: as short as the first backoff (0.2 s), growing with it up
    #: to ``reconnect_backoff_max``, so an unreachable coordinator is given up on fast;
    #: but a coordinator that many workers connect to at once (10,000 streams, a loaded
    #: host) answers handshakes slower than that, and every attempt then fails and comes
    #: back, a storm of its own (issue 19). gRPC's own default is 20 s. A
    #: :class:`~conveyor.worker.Worker` given ``None`` uses :data:`WORKER_CONNECT_TIMEOUT`.
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1 << 20:
            raise ValueError(
                f"max_message_bytes must be at least 1 MiB, got {self.max_message_bytes}"
            )
        # Each goes to gRPC as whole milliseconds: a finite number, at most an int32.
        if self.keepalive_interval is not None:
            _check_seconds("keepalive_interval", self.keepalive_interval, "from 1", 1)
        _check_seconds("keepalive_timeout", self.keepalive_timeout, "above 0", 0, strict=True)
        if self.connect_timeout is not None:
            _check_seconds("connect_timeout", self.connect_timeout, "from 0.1", 0.1)
        _check_seconds("reconnect_backoff_max", self.reconnect_backoff_max, "from 0.1", 0.1)
        for pair in self.metadata:
            if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
                raise ValueError(f"metadata must be (key, value) string pairs, got {pair!r}")
        if self.api_key is not None and (not self.api_key or "\n" in self.api_key):
            raise ValueError("api_key must be a non-empty single-line string")

    @classmethod
    def merge(
        cls,
        options: ConnectionOptions | None,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        addresses: Sequence[str] = (),
    ) -> ConnectionOptions:
        """``options`` with the shortcut arguments of the client and worker applied; the
        API key from ``CONVEYOR_API_KEY`` when neither gives one, else that of a local
        ``conveyor dev`` listening on one of ``addresses`` (see ``_devkey``).

        Raises:
            ValueError: A shortcut and ``options`` both set the same thing.
        """
        base = options or cls()
        changes: dict[str, Any] = {}
        if api_key is not None:
            if base.api_key is not None and base.api_key != api_key:
                raise ValueError("api_key is given twice (directly and in options)")
            changes["api_key"] = api_key
        elif base.api_key is None and base.find_api_key and os.environ.get(API_KEY_ENV, "").strip():
            changes["api_key"] = os.environ[API_KEY_ENV].strip()
        elif base.api_key is None and base.find_api_key and addresses:
            from conveyor.transport._devkey import find_dev_key

            found = find_dev_key(addresses)
            if found is not None:
                changes["api_key"] = found.key
        if credentials is not None:
            if base.credentials is not None and base.credentials is not credentials:
                raise ValueError("credentials are given twice (directly and in options)")
            changes["credentials"] = credentials
        if metadata:
            changes["metadata"] = (*base.metadata, *(tuple(pair) for pair in metadata))
        return dataclasses.replace(base, **changes) if changes else base

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent with every call: the API key, then :attr:`metadata`."""
        key = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return (*key, *self.metadata)

    def channel_options(self) -> list[tuple[str, Any]]:
        """The gRPC channel arguments these options stand for."""
        backoff_ms = int(self.reconnect_backoff_max * 1000)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(200, backoff_ms)),
            # gRPC's name for the least time a connection attempt is given (its minimum
            # connect timeout), not a backoff.
            (
                "grpc.min_reconnect_backoff_ms",
                min(200, backoff_ms)
                if self.connect_timeout is None
                else int(self.connect_timeout * 1000),
            ),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            *FLOW_CONTROL_OPTIONS,
        ]
        if self.keepalive_interval is not None:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_interval * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
                # gRPC 1.6x+ waits for a ping's answer this long (default: a minute),
                # whatever keepalive_timeout says; without it a dead peer is noticed late.
                ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout * 1000)),
                # Ping only while a call is open: an idle client has nothing to lose, and
                # servers treat pings on an idle connection as abuse.
                ("grpc.keepalive_permit_without_calls", 0),
                # gRPC stops pinging after two pings without data by default, which would
                # end the watch on a quiet stream exactly when it matters.
                ("grpc.http2.max_pings_without_data", 0),
            ]
        return options

    def open_channel(self, address: str) -> aio.Channel:
        """A new grpc.aio channel to ``address`` (``host:port``) with these options."""
        interceptors = list(self.interceptors) or None
        if self.credentials is None:
            return aio.insecure_channel(
                address, options=self.channel_options(), interceptors=interceptors
            )
        return aio.secure_channel(
            address, self.credentials, options=self.channel_options(), interceptors=interceptors
        )


_MAX_SECONDS = (2**31 - 1) / 1000
"""The longest duration gRPC takes as a channel option (an int32 of milliseconds)."""


def _check_seconds(name: str, value: float, rule: str, least: float, strict: bool = False) -> None:
    """Refuses a duration option gRPC cannot take: NaN, infinite, under ``least`` (or at
    it, ``strict``), or over :data:`_MAX_SECONDS`; the message says ``rule``."""
    low = value > least if strict else value >= least
    if not (math.isfinite(value) and low and value <= _MAX_SECONDS):
        raise ValueError(
            f"{name} must be a number of seconds {rule} up to {_MAX_SECONDS}; got {value}"
        )
