"""Certificates for the TLS tests, made by a throwaway CA (``trustme``) into a folder.

:func:`make_tls_files` writes a CA, a server certificate for ``127.0.0.1`` and
``localhost``, and a client certificate, as the PEM files the flags take.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one test CA: its certificate, a server pair and a client pair."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def issue_server(
        self,
        folder: Path,
        name: str = "server",
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[Path, Path]:
        """Another server certificate of this CA: (chain file, key file) in ``folder``."""
        return write_pair(
            self.ca.issue_cert(
                "127.0.0.1", "localhost", not_before=not_before, not_after=not_after
            ),
            folder,
            name,
        )


def write_pair(cert: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    """Writes ``cert``'s chain and key as ``<name>.pem`` and ``<name>.key``."""
    folder.mkdir(parents=True, exist_ok=True)
    chain, key = folder / f"{name}.pem", folder / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


def make_tls_files(folder: Path, *, prefix: str = "") -> TLSFiles:
    """A fresh CA with a server certificate (127.0.0.1, localhost) and a client
    certificate, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = folder / f"{prefix}ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = write_pair(
        ca.issue_cert("127.0.0.1", "localhost"), folder, f"{prefix}server"
    )
    client_cert, client_key = write_pair(
        ca.issue_cert("worker.conveyor.test", common_name="worker"), folder, f"{prefix}client"
    )
    return TLSFiles(ca, ca_file, cert_file, key_file, client_cert, client_key)
