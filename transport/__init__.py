"""The connection layer shared by :mod:`conveyor.client` and :mod:`conveyor.worker`.

* :class:`ConnectionOptions`: credentials, API key and metadata, message limits,
  keepalive and client interceptors; every channel is opened from one.
* Failover rules (:func:`parse_addresses`, :class:`AddressBook`, :class:`Backoff`): which
  coordinator to ask next, and how long to wait.
* The error catalog (:func:`error_from_rpc`): every ``conveyor.v1.ErrorReason`` maps to
  exactly one exception class; the tree is drawn in ``_errors.py`` and exported to
  applications by :mod:`conveyor.client` (and the worker's by :mod:`conveyor.worker`).

* TLS from PEM files (:func:`tls_credentials` for channels, :class:`ServerTLS` for the
  coordinator), checked up front (:class:`TLSConfigError`).

* End-to-end payload encryption (:class:`EncryptionCodec` over a :class:`KeyRing`;
  :class:`PayloadCodec` is what the client and the worker call).

Applications normally need only :class:`ConnectionOptions`, which both packages accept.
"""

from conveyor.transport._encryption import (
    ENCRYPTED_CONTENT_TYPE,
    Binding,
    DecryptionError,
    EncryptionCodec,
    EncryptionError,
    KeyedCodec,
    KeyRing,
    KeyRingError,
    KeyUnavailableError,
    PayloadCodec,
)
from conveyor.transport._errors import StatusInfo, error_from_rpc, parse_status
from conveyor.transport._failover import AddressBook, Backoff, parse_addresses
from conveyor.transport._options import MAX_MESSAGE_BYTES, ClientInterceptor, ConnectionOptions
from conveyor.transport._tls import ServerTLS, TLSConfigError, tls_credentials

__all__ = [
    "ENCRYPTED_CONTENT_TYPE",
    "MAX_MESSAGE_BYTES",
    "AddressBook",
    "Backoff",
    "Binding",
    "ClientInterceptor",
    "ConnectionOptions",
    "DecryptionError",
    "EncryptionCodec",
    "EncryptionError",
    "KeyRing",
    "KeyRingError",
    "KeyUnavailableError",
    "KeyedCodec",
    "PayloadCodec",
    "ServerTLS",
    "StatusInfo",
    "TLSConfigError",
    "error_from_rpc",
    "parse_addresses",
    "parse_status",
    "tls_credentials",
]
