"""TLS files: every way a file can be wrong is one error naming the file and the flag,
and the coordinator's certificate is reloaded only when the new files check out."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import trustme
from tlsfiles import TLSFiles, make_tls_files, write_pair

from conveyor.coordinator import CoordinatorConfig
from conveyor.coordinator.config import ConfigError
from conveyor.transport import ServerTLS, TLSConfigError, tls_credentials


@pytest.fixture
def files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")


def test_good_files_make_credentials(files: TLSFiles) -> None:
    assert isinstance(tls_credentials(files.ca_file), grpc.ChannelCredentials)
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)  # the system's roots
    both = tls_credentials(files.ca_file, files.client_cert_file, files.client_key_file)
    assert isinstance(both, grpc.ChannelCredentials)


def test_missing_empty_and_directory_files_are_named(files: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match=r"CA file \(--tls-ca\) '.*nope.pem' does not exist"):
        tls_credentials(tmp_path / "nope.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(TLSConfigError, match="is empty"):
        tls_credentials(empty)
    with pytest.raises(TLSConfigError, match="is a directory"):
        tls_credentials(tmp_path)


def test_unreadable_file_says_why(files: TLSFiles) -> None:
    # (A path under a file: unreadable even for root, who reads files whatever their mode.)
    with pytest.raises(TLSConfigError, match=r"cannot read CA file .*: Not a directory"):
        tls_credentials(files.ca_file / "ca.pem")


def test_not_pem_and_swapped_files(files: TLSFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        tls_credentials(junk)
    with pytest.raises(TLSConfigError, match="swap the certificate and key flags"):
        tls_credentials(files.ca_file, files.client_key_file, files.client_cert_file)


def test_key_of_another_certificate_is_refused(files: TLSFiles) -> None:
    with pytest.raises(
        TLSConfigError,
        match=r"client key \(--tls-key\) '.*server.key' does not belong to client "
        r"certificate \(--tls-cert\)",
    ):
        tls_credentials(files.ca_file, files.client_cert_file, files.key_file)


def test_half_a_pair_is_refused(files: TLSFiles) -> None:
    with pytest.raises(TLSConfigError, match="needs both files"):
        tls_credentials(files.ca_file, cert_file=files.client_cert_file)
    with pytest.raises(TLSConfigError, match="needs both files"):
        tls_credentials(files.ca_file, key_file=files.client_key_file)


def test_expired_and_future_certificates(files: TLSFiles, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    old_cert, old_key = files.issue_server(
        tmp_path, "old", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    with pytest.raises(TLSConfigError, match=r"expired on .* UTC; renew it"):
        ServerTLS(old_cert, old_key)
    future_cert, future_key = files.issue_server(
        tmp_path, "future", not_before=now + timedelta(days=1), not_after=now + timedelta(days=9)
    )
    with pytest.raises(TLSConfigError, match=r"not valid before .* clock right"):
        ServerTLS(future_cert, future_key)


def test_encrypted_key_is_explained(files: TLSFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(files.key_file.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted with a passphrase"):
        ServerTLS(files.cert_file, locked)


def test_server_tls_reloads_only_files_that_check_out(
    files: TLSFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTLS(files.cert_file, files.key_file, files.ca_file)
    assert tls.mutual
    assert isinstance(tls.server_credentials(), grpc.ServerCredentials)
    assert tls.reload() is None  # nothing changed
    first = tls.material.cert_chain

    # A renewal half written: the new certificate, the old key. Refused, logged once.
    other = trustme.CA().issue_cert("127.0.0.1")
    new_cert, new_key = write_pair(other, tmp_path / "renewed", "server")
    files.cert_file.write_bytes(new_cert.read_bytes())
    os.utime(files.cert_file, ns=(1, 1))  # a new mtime even on a coarse clock
    with caplog.at_level(logging.WARNING, logger="conveyor.transport"):
        assert tls.reload() is None
        assert tls.reload() is None
    refusals = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert "does not belong to" in refusals[0].getMessage()
    assert tls.material.cert_chain == first and tls.reloads == 0

    # The key follows: now the pair checks out and is served from the next handshake.
    files.key_file.write_bytes(new_key.read_bytes())
    assert isinstance(tls.reload(), grpc.ServerCertificateConfiguration)
    assert tls.material.cert_chain == new_cert.read_bytes() and tls.reloads == 1
    assert tls.reload() is None


def test_config_checks_the_tls_settings_go_together() -> None:
    with pytest.raises(ConfigError, match="needs both tls_cert_file and tls_key_file"):
        CoordinatorConfig(dsn="postgresql://x", tls_cert_file="a.pem")
    with pytest.raises(ConfigError, match=r"tls_client_ca_file .* needs TLS"):
        CoordinatorConfig(dsn="postgresql://x", tls_client_ca_file="ca.pem")
    CoordinatorConfig(
        dsn="postgresql://x", tls_cert_file="a", tls_key_file="b", tls_client_ca_file="c"
    )
