"""What the global TLS and encryption options mean for the CLI, in one place.

Every channel the CLI opens (the client library's, the raw reads of ``wire.py``, the
health checks of ``conveyor health``) is made from :func:`connection_options`:

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

from typing import Any

import grpc

from conveyor.cli.app import Globals
from conveyor.client import Task
from conveyor.client._encryption import open_task as _open_task
from conveyor.transport import ConnectionOptions, EncryptionCodec
from conveyor.transport._tls import tls_credentials

__all__ = [
    "active",
    "client_settings",
    "connection_options",
    "open_channel",
    "open_task",
    "payload_codec",
    "use",
    "uses_tls",
    "worker_settings",
]

_active: Globals | None = None
_cached: tuple[Globals, ConnectionOptions] | None = None


def use(g: Globals) -> None:
    """Makes ``g`` the options of this invocation's raw channels (:func:`open_channel`)."""
    global _active
    _active = g


def active() -> Globals:
    """The global options of the command running (the defaults before any runs)."""
    return _active or Globals()


def uses_tls(g: Globals) -> bool:
    """Whether the options ask for TLS to the coordinator."""
    return bool(g.tls or g.tls_ca or g.tls_cert or g.tls_key)


def connection_options(g: Globals) -> ConnectionOptions:
    """The transport settings ``g`` stands for (the files are read on the first call).

    Raises:
        TLSConfigError: A TLS file is missing, unreadable, not PEM, expired, or only one
            of ``--tls-cert``/``--tls-key`` is given.
    """
    global _cached
    if _cached is not None and _cached[0] == g:
        return _cached[1]
    credentials = None
    if uses_tls(g):
        credentials = tls_credentials(g.tls_ca, g.tls_cert, g.tls_key)
    options = ConnectionOptions(credentials=credentials)
    _cached = (g, options)
    return options


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


def open_task(task: Task) -> Task:
    """``task`` as the running command's codec decrypts it (unchanged without one)."""
    return _open_task(payload_codec(active()), task)


def client_settings(g: Globals) -> dict[str, Any]:
    """The keyword arguments of ``AsyncClient`` and ``Client`` that ``g`` stands for."""
    return {"options": connection_options(g), "codec": payload_codec(g)}


def worker_settings(g: Globals) -> dict[str, Any]:
    """The keyword arguments of ``Worker.configure`` that ``g`` stands for: only what the
    flags set, so a worker's own settings stay when no flag is given."""
    settings: dict[str, Any] = {}
    options = connection_options(g)
    if options.credentials is not None:
        settings["credentials"] = options.credentials
    codec = payload_codec(g)
    if codec is not None:
        settings["codec"] = codec
    return settings


def open_channel(address: str) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` with the running command's options."""
    return connection_options(active()).open_channel(address)
