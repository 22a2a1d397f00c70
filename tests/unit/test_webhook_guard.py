"""The webhook address guard and the signature round trip (pure logic, plus the system
resolver for ``localhost``)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest

from conveyor.client.webhooks import WebhookReceiver, WebhookVerificationError
from conveyor.coordinator.api.webhook_service import new_secret, secret_problem
from conveyor.coordinator.webhooks.delivery import backoff, message_id
from conveyor.coordinator.webhooks.guard import (
    GuardedResolver,
    TargetRefused,
    address_problem,
    url_problem,
)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
        "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "::", "fe80::1", "fd00:ec2::254",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::a00:1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_urls() -> None:
    assert url_problem("https://hooks.example.com/x?a=1", allow_private=False) is None
    assert url_problem("https://8.8.8.8:8443/x", allow_private=False) is None
    for url in ("http://hooks.example.com/", "https://127.0.0.1/", "https://LOCALHOST./x",
                "https://a.localhost/", "https://[::1]:80/", "gopher://x/", "https:///x",
                "https://u:p@example.com/", "https://example.com/#f", "https://exa mple.com/",
                "https://example.com:99999/"):  # fmt: skip
        assert url_problem(url, allow_private=False) is not None, url
    # The operator's setting lets loopback and plain http through, never a broken URL.
    assert url_problem("http://127.0.0.1:8080/hook", allow_private=True) is None
    assert url_problem("ftp://127.0.0.1/", allow_private=True) is not None


async def test_the_resolver_refuses_names_of_private_addresses() -> None:
    guarded = GuardedResolver(allow_private=False)
    try:
        with pytest.raises(TargetRefused, match="loopback"):
            await guarded.resolve("localhost", 443)
    finally:
        await guarded.close()
    allowed = GuardedResolver(allow_private=True)
    try:
        assert await allowed.resolve("localhost", 443)
    finally:
        await allowed.close()


def test_secrets_and_signatures_round_trip() -> None:
    from standardwebhooks.webhooks import Webhook

    secret = new_secret()
    assert secret_problem(secret) is None
    assert secret_problem("whsec_" + "A" * 8) is not None
    assert secret_problem("sk_abc") is not None
    body = (
        b'{"type":"task.succeeded","timestamp":"2026-12-07T05:00:00Z","data":{"task_id":"x",'
        b'"queue":"q","type":"t","from_state":"RUNNING","state":"SUCCEEDED","attempt":1}}'
    )
    now = datetime.now(UTC)
    headers = {
        "Webhook-Id": message_id(7),
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": Webhook(secret).sign(message_id(7), now, body),
    }
    event = WebhookReceiver(secret).verify(body, headers)
    assert (event.id, event.state.value, event.from_state.value) == (
        "msg_7",
        "SUCCEEDED",
        "RUNNING",
    )
    with pytest.raises(WebhookVerificationError):
        WebhookReceiver(new_secret()).verify(body, headers)
    # Signed right, but an hour old: a captured request sent again.
    then = datetime.fromtimestamp(int(now.timestamp()) - 3600, UTC)
    stale = {
        **headers,
        "Webhook-Timestamp": str(int(then.timestamp())),
        "Webhook-Signature": Webhook(secret).sign(message_id(7), then, body),
    }
    with pytest.raises(WebhookVerificationError, match="old"):
        WebhookReceiver(secret).verify(body, stale)


def test_backoff_grows_and_is_capped() -> None:
    assert 0.8 <= backoff(1, 1.0) <= 1.2
    assert 6.4 <= backoff(4, 1.0) <= 9.6
    assert backoff(40, 1.0) <= 360.0
