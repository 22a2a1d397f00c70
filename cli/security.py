"""What the global TLS and encryption options mean for the CLI, in one place.

Every channel the CLI opens (``Globals.options()``: the client library's, its connection
layer for the AdminService calls of ``wire.py``, the health checks of ``conveyor
health``) is made from :func:`channel_credentials`:

- ``--tls-ca FILE`` (or ``--tls``, trusting the system's CAs) turns TLS on;
- ``--tls-cert`` and ``--tls-key`` add a client certificate (mutual TLS);
- without any of them the channel is plaintext, as before.

``conveyor coordinator`` and ``conveyor dev`` read ``--tls-cert`` and ``--tls-key`` as
the coordinator's own certificate instead (see ``services.py``).

``--encryption-key-file`` (``CONVEYOR_ENCRYPTION_KEY_FILE``) gives the client and the
worker an :class:`~conveyor.client.EncryptionCodec`: payloads are encrypted before they
leave, and what the CLI shows is decrypted (see :func:`payload_codec`).

The files are read when a command first needs them (a bad file is one line naming it),
not at start, so a command that needs none never fails on them.
"""

from __future__ import annotations

import grpc

from conveyor.cli.app import Globals
from conveyor.client import Task
from conveyor.client._encryption import open_task as _open_task
from conveyor.transport import EncryptionCodec
from conveyor.transport._tls import tls_credentials

__all__ = [
    "channel_credentials",
    "open_task",
    "payload_codec",
    "uses_tls",
]

_credentials: dict[tuple[str | None, str | None, str | None], grpc.ChannelCredentials] = {}


def uses_tls(g: Globals) -> bool:
    """Whether the options ask for TLS to the coordinator."""
    return bool(g.tls or g.tls_ca or g.tls_cert or g.tls_key)


def channel_credentials(g: Globals) -> grpc.ChannelCredentials | None:
    """The TLS credentials ``g`` asks for; None for plaintext. The files are read once
    per command.

    Raises:
        TLSConfigError: A TLS file is missing, unreadable, not PEM, expired, or only one
            of ``--tls-cert``/``--tls-key`` is given.
    """
    if not uses_tls(g):
        return None
    files = (g.tls_ca, g.tls_cert, g.tls_key)
    if files not in _credentials:
        _credentials[files] = tls_credentials(*files)
    return _credentials[files]


_codecs: dict[str, EncryptionCodec] = {}


def payload_codec(g: Globals) -> EncryptionCodec | None:
    """The encryption codec ``--encryption-key-file`` names; None without one.

    Raises:
        KeyRingError: The key file is missing, unreadable or invalid.
    """
    path = g.encryption_key_file
    if not path:
        return None
    if path not in _codecs:
        _codecs[path] = EncryptionCodec.from_key_file(path)
    return _codecs[path]


def open_task(g: Globals, task: Task) -> Task:
    """``task`` as the command's codec decrypts it (unchanged without one)."""
    return _open_task(payload_codec(g), task)
