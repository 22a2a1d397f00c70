"""TLS from PEM files, checked before gRPC sees them.

gRPC takes PEM bytes and, given a wrong file, fails late and vaguely: a key that does not
match its certificate surfaces as a failed handshake on the first connection, a missing
file as a Python ``OSError`` without the flag's name. This module reads the files once,
checks what can be checked (readable, PEM, a certificate and a key that belong together,
within their validity period) and raises :class:`TLSConfigError` naming the file and
what to do.

* :func:`tls_credentials`: channel credentials for clients and workers (a CA to trust,
  optionally a client certificate for mutual TLS), for ``ConnectionOptions(credentials=)``.
* :class:`ServerTLS`: the coordinator's certificate, key and optional client CA, as
  ``grpc.ServerCredentials`` that pick up renewed files on the next handshake (a
  certificate renewed by cert-manager or certbot needs no restart). A renewal that does
  not check out (a key written before its certificate, say) is logged and the previous
  certificate stays in use until the files agree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from conveyor.transport._errors import ConveyorError

__all__ = ["ServerTLS", "TLSConfigError", "TLSMaterial", "tls_credentials"]

logger = logging.getLogger("conveyor.transport")

_PUBLIC_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TLSConfigError(ConveyorError, ValueError):
    """A TLS file is missing, unreadable, not PEM, expired, or does not fit its pair.

    The message names the file (and the flag it came from, where one did) and what to do.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class TLSMaterial:
    """Checked PEM bytes, as gRPC takes them."""

    #: The certificate chain (leaf first), or None.
    cert_chain: bytes | None = None
    #: The private key of the chain's leaf, or None.
    private_key: bytes | None = None
    #: Certificates to trust for the peer, or None.
    root_certificates: bytes | None = None
    #: When the leaf certificate expires.
    not_after: datetime | None = None


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} {os.fspath(path)!r} is a directory, not a PEM file") from None
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read {what} {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from None
    if not data.strip():
        raise TLSConfigError(f"{what} {os.fspath(path)!r} is empty")
    return data


def _certificates(data: bytes, path: str | os.PathLike[str], what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        hint = (
            " (it holds a private key: swap the certificate and key flags?)"
            if (b"PRIVATE KEY-----" in data)
            else ""
        )
        raise TLSConfigError(
            f"{what} {os.fspath(path)!r} holds no PEM certificate "
            f"('-----BEGIN CERTIFICATE-----'){hint}"
        )
    return certs


def _private_key(data: bytes, path: str | os.PathLike[str], what: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{what} {os.fspath(path)!r} is encrypted with a passphrase; gRPC needs an "
            "unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        hint = (
            " (it holds a certificate: swap the certificate and key flags?)"
            if (b"BEGIN CERTIFICATE" in data)
            else ""
        )
        raise TLSConfigError(
            f"{what} {os.fspath(path)!r} holds no usable PEM private key{hint}: {exc}"
        ) from None


def _check_validity(cert: x509.Certificate, path: str | os.PathLike[str], what: str) -> None:
    now = datetime.now(UTC)
    if cert.not_valid_after_utc <= now:
        raise TLSConfigError(
            f"{what} {os.fspath(path)!r} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it"
        )
    if cert.not_valid_before_utc > now:
        raise TLSConfigError(
            f"{what} {os.fspath(path)!r} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this machine's clock right?)"
        )


def load_pair(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    cert_what: str = "certificate",
    key_what: str = "private key",
) -> TLSMaterial:
    """Reads and checks a certificate chain and its private key.

    Raises:
        TLSConfigError: Either file is unusable, or the key is not the certificate's.
    """
    chain = _read(cert_file, cert_what)
    key = _read(key_file, key_what)
    leaf = _certificates(chain, cert_file, cert_what)[0]
    private = _private_key(key, key_file, key_what)
    if private.public_key().public_bytes(*_PUBLIC_DER) != leaf.public_key().public_bytes(
        *_PUBLIC_DER
    ):
        raise TLSConfigError(
            f"{key_what} {os.fspath(key_file)!r} does not belong to {cert_what} "
            f"{os.fspath(cert_file)!r} (their public keys differ): give the key the "
            "certificate was issued for"
        )
    _check_validity(leaf, cert_file, cert_what)
    return TLSMaterial(cert_chain=chain, private_key=key, not_after=leaf.not_valid_after_utc)


def load_ca(ca_file: str | os.PathLike[str], *, what: str = "CA file") -> bytes:
    """Reads a bundle of trusted certificates; at least one must be PEM.

    Raises:
        TLSConfigError: The file is unusable.
    """
    data = _read(ca_file, what)
    _certificates(data, ca_file, what)
    return data


def tls_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for TLS to a coordinator, from PEM files.

    Pass the result as ``ConnectionOptions(credentials=...)`` (or ``credentials=`` of
    :class:`~conveyor.worker.Worker`)::

        options = ConnectionOptions(credentials=tls_credentials("ca.pem"))

    Args:
        ca_file: Certificates to trust for the coordinator (the CA that issued its
            certificate); ``None`` trusts the system's roots.
        cert_file: A client certificate chain for mutual TLS (with ``key_file``).
        key_file: The client certificate's private key (unencrypted PEM).

    The files are read once, here: renewing a client certificate takes a new client.

    Raises:
        TLSConfigError: A file is missing, unreadable or not PEM, a certificate expired,
            the key does not match the certificate, or only one of the pair is given.
    """
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError(
            "a client certificate needs both files: give cert_file and key_file "
            "(--tls-cert and --tls-key), or neither"
        )
    roots = load_ca(ca_file, what="CA file (--tls-ca)") if ca_file is not None else None
    pair = TLSMaterial()
    if cert_file is not None and key_file is not None:
        pair = load_pair(
            cert_file,
            key_file,
            cert_what="client certificate (--tls-cert)",
            key_what="client key (--tls-key)",
        )
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=pair.private_key,
        certificate_chain=pair.cert_chain,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Version:
    """What identifies the files' current contents without reading them."""

    stats: tuple[tuple[int, int, int], ...]


class ServerTLS:
    """The coordinator's TLS set-up: certificate, key, optional client CA, reloaded.

    Construction reads and checks the files (:class:`TLSConfigError` when they do not
    check out). :meth:`server_credentials` gives the gRPC server credentials; on each
    new connection's handshake gRPC asks whether the files changed (a ``stat`` of each),
    and a change that checks out is served from then on. Connections already open keep
    the certificate they were made with.

    Args:
        cert_file: The coordinator's certificate chain (PEM, leaf first).
        key_file: Its private key (unencrypted PEM).
        client_ca_file: Certificates that issue client certificates. When given, every
            client must present a certificate issued by one of them (mutual TLS).
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        client_ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cert_file = os.fspath(cert_file)
        self.key_file = os.fspath(key_file)
        self.client_ca_file = os.fspath(client_ca_file) if client_ca_file else None
        self._lock = threading.Lock()
        self._version = self._stat()
        self.material = self._load()
        # The last version a reload refused, so each bad state is logged once.
        self._refused: _Version | None = None
        #: How many times new files were taken into use since start.
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca_file is not None

    def _paths(self) -> tuple[str, ...]:
        return (self.cert_file, self.key_file) + (
            (self.client_ca_file,) if self.client_ca_file else ()
        )

    def _stat(self) -> _Version:
        stats = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                stats.append((0, 0, 0))
            else:
                stats.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return _Version(tuple(stats))

    def _load(self) -> TLSMaterial:
        pair = load_pair(
            self.cert_file,
            self.key_file,
            cert_what="server certificate (--tls-cert)",
            key_what="server key (--tls-key)",
        )
        roots = (
            load_ca(self.client_ca_file, what="client CA file (--tls-client-ca)")
            if self.client_ca_file
            else None
        )
        return dataclasses.replace(pair, root_certificates=roots)

    def _configuration(self, material: TLSMaterial) -> grpc.ServerCertificateConfiguration:
        assert material.private_key is not None and material.cert_chain is not None
        return grpc.ssl_server_certificate_configuration(
            [(material.private_key, material.cert_chain)],
            root_certificates=material.root_certificates,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the current files (reloaded when they change)."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.material),
            # gRPC documents None as "unchanged"; types-grpcio's signature leaves it out.
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake: a new configuration, or None to keep
        the current one. Runs on a gRPC thread; must never raise."""
        try:
            return self.reload()
        except Exception:  # a bug here must not break every handshake
            logger.exception("checking the TLS files for changes failed")
            return None

    def reload(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and check out, else None."""
        with self._lock:
            version = self._stat()
            if version in (self._version, self._refused):
                return None
            try:
                material = self._load()
            except TLSConfigError as exc:
                self._refused = version
                logger.warning(
                    "the TLS files changed but cannot be used (%s); still serving the "
                    "certificate loaded before",
                    exc,
                )
                return None
            self._version, self._refused = version, None
            self.material = material
            self.reloads += 1
            logger.info(
                "serving the renewed TLS certificate %s (valid until %s)",
                self.cert_file,
                f"{material.not_after:%Y-%m-%d %H:%M} UTC" if material.not_after else "?",
            )
            return self._configuration(material)
