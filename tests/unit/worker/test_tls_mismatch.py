"""A worker whose TLS does not match the coordinator's says which mismatch is likely
(issue 20, break 3) instead of "cannot reach the coordinator ... (Socket closed)" or, for a
failed handshake, "(OK)" (the last words of gRPC's text)."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from conveyor.transport._tls_hints import ANY_TLS, PLAINTEXT
from conveyor.worker._session import _classify

CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:a:1: Socket closed"
VERIFY = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:a:1: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:a:1: Connection refused"


def _unavailable(details: str) -> AioRpcError:
    return AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), details=details)


@pytest.mark.parametrize(
    ("details", "dialled", "said"),
    [
        (CLOSED, PLAINTEXT, "it probably serves TLS; pass --tls-ca"),
        (CLOSED, ANY_TLS, "it probably requires a client certificate it trusts"),
        (VERIFY, ANY_TLS, "(CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"),
    ],
)
def test_a_tls_mismatch_is_named(details: str, dialled: str, said: str) -> None:
    end = _classify(_unavailable(details), "a:1", welcomed=False, heard=False, dialled=dialled)
    assert end.error is not None and said in end.error and end.rejected, end


def test_a_refused_connection_is_still_unreachable() -> None:
    end = _classify(_unavailable(REFUSED), "a:1", welcomed=False, heard=False, dialled=PLAINTEXT)
    assert (end.reached, end.error) == (False, "Connection refused")
