"""Where the coordinator binds its port: plaintext, TLS, or mutual TLS.

The files are read and checked before the server binds (``TLSConfigError`` names the
file and the flag), and the server credentials pick up renewed files on the next
handshake (see ``conveyor.transport._tls.ServerTLS``).
"""

from __future__ import annotations

import logging

import grpc

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.transport._tls import ServerTLS

__all__ = ["add_port", "server_tls"]

_log = logging.getLogger("conveyor.coordinator")


def server_tls(config: CoordinatorConfig) -> ServerTLS | None:
    """The checked TLS set-up of ``config``; None when it serves plaintext.

    Raises:
        TLSConfigError: A file is missing, unreadable, not PEM, expired or mismatched.
    """
    if not config.tls_cert_file:
        return None
    return ServerTLS(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file or None)


def add_port(server: grpc.aio.Server, listen: str, tls: ServerTLS | None) -> int:
    """Binds ``listen`` on ``server``, with TLS when ``tls`` is given; returns the port
    (0 when binding failed)."""
    if tls is None:
        return server.add_insecure_port(listen)
    port = server.add_secure_port(listen, tls.server_credentials())
    _log.info(
        "serving TLS with %s (valid until %s)%s",
        tls.cert_file,
        f"{tls.material.not_after:%Y-%m-%d %H:%M} UTC" if tls.material.not_after else "?",
        f"; clients must present a certificate issued by {tls.client_ca_file}"
        if tls.client_ca_file
        else "",
    )
    return port
