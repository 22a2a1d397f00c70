"""What a failed connection says about a TLS mismatch, in words for a person: shared by
the CLI's one-line errors and the worker's log, so both name the likely cause instead of
"cannot reach the coordinator ... is it running?".

gRPC's client sees a TLS handshake fail with OpenSSL's reason (``CERTIFICATE_VERIFY_FAILED``:
a certificate from another CA; ``WRONG_VERSION_NUMBER``: the server speaks plaintext), but
a server that hangs up during the handshake (no client certificate, one it does not trust,
a plaintext client on its TLS port) only as "Socket closed": there, how the caller dialled
tells the likely cause.
"""

from __future__ import annotations

import re

__all__ = ["ANY_TLS", "MUTUAL_TLS", "PLAINTEXT", "SERVER_TLS", "tls_mismatch"]

#: How the caller dialled, as far as TLS goes ("" when unknown): in plaintext, in TLS
#: without or with a client certificate, or in TLS with credentials that do not say.
PLAINTEXT, SERVER_TLS, MUTUAL_TLS, ANY_TLS = "plaintext", "tls", "mutual-tls", "any-tls"

_TLS_REASON = re.compile(r"OPENSSL_internal:([A-Z_]+(?::[^;]*)?)")


def tls_mismatch(message: str, where: str, dialled: str = "") -> str | None:
    """The likely TLS mismatch behind gRPC's ``message`` for a connection to ``where``
    (how it was ``dialled``: PLAINTEXT, SERVER_TLS, MUTUAL_TLS or ""), else None."""
    text = message.lower()
    if "handshake failed" in text:
        found = _TLS_REASON.search(message)
        reason = found[1].strip() if found else "no reason given"
        if "WRONG_VERSION_NUMBER" in reason:
            return (
                f"{where} did not answer in TLS ({reason}): it probably serves plaintext; "
                "leave out --tls-ca (and CONVEYOR_TLS_CA), or dial its TLS port"
            )
        return (
            f"the TLS handshake with {where} failed ({reason}): check that --tls-ca names "
            "the CA that issued the coordinator's certificate, for the address dialled, and, "
            "if it requires client certificates, --tls-cert and --tls-key"
        )
    if not text.endswith("socket closed") or not dialled:
        return None
    if dialled == PLAINTEXT:
        return (
            f"{where} closed the connection at once: it probably serves TLS; pass --tls-ca "
            "with the CA that issued its certificate (and --tls-cert and --tls-key if it "
            "requires client certificates)"
        )
    if dialled == SERVER_TLS:
        return (
            f"{where} closed the TLS connection: it probably requires a client certificate "
            "(mutual TLS); pass --tls-cert and --tls-key"
        )
    if dialled == MUTUAL_TLS:
        return (
            f"{where} closed the TLS connection: it probably refuses this client certificate; "
            "--tls-cert must be issued by the CA it trusts for clients (its --tls-client-ca) "
            "and be valid now"
        )
    return (
        f"{where} closed the TLS connection: it probably requires a client certificate it "
        "trusts (mutual TLS): --tls-cert and --tls-key, issued by the CA of its "
        "--tls-client-ca"
    )
