"""Where a webhook delivery may go: a tenant's URL is untrusted.

By default a delivery goes only to a public address over HTTPS. Refused: plain HTTP,
loopback, private (RFC 1918, unique-local), link-local (cloud metadata services live at
169.254.169.254 and fd00:ec2::254), shared (carrier-grade NAT), multicast, reserved and
unspecified addresses, IPv4 addresses dressed as IPv6 included. The check runs on the
addresses the name resolves to, at each delivery (:class:`GuardedResolver`, the resolver
of the deliverer's HTTP client, so the addresses checked are the addresses connected to:
no second lookup to rebind), and on the URL's own address when it is one (which no
resolver sees). Redirects are not followed: a 3xx answer is a failed attempt.

The operator setting ``webhook_allow_private`` (``--webhook-allow-private``) allows any
address and plain HTTP, for receivers inside the operator's own network (and tests).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64 (RFC 6052): an IPv4 address in the last 32 bits, reached through a translator.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetRefused(OSError):
    """A delivery's target is not allowed (see the module docstring)."""


def address_problem(address: IPAddress) -> str | None:
    """Why a delivery may not go to ``address`` by default (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is None and address in _NAT64:
            mapped = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if mapped is not None:
            return address_problem(mapped)
    if address.is_loopback:
        return f"{address} is a loopback address"
    if address.is_link_local:
        return f"{address} is a link-local address (where cloud metadata services answer)"
    if address.is_unspecified:
        return f"{address} is the unspecified address"
    if address.is_multicast:
        return f"{address} is a multicast address"
    if address.is_private:
        return f"{address} is a private address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def url_problem(url: str, *, allow_private: bool) -> str | None:
    """What is wrong with ``url`` as a webhook target, before any lookup (None: nothing).

    Checks the form (http or https, a host, no user name or password in it, no fragment)
    and, unless ``allow_private``, HTTPS and the address when the host is one.
    """
    if len(url) > MAX_URL_LENGTH:
        return f"the URL is longer than {MAX_URL_LENGTH} characters"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return "the URL contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"the URL cannot be parsed ({exc})"
    if parts.scheme not in ("https", "http"):
        return f"the URL's scheme must be https (got {parts.scheme or 'none'!r})"
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "the URL must not carry a user name or password"
    if parts.fragment:
        return "the URL must not have a fragment (#...)"
    if port == 0:
        return "the URL's port must not be 0"
    if allow_private:
        return None
    if parts.scheme != "https":
        return (
            "the URL must use https (plain http only with the coordinator's "
            "--webhook-allow-private)"
        )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
            return f"{host} is a loopback name"
        return None  # a name: its addresses are checked at each delivery
    problem = address_problem(address)
    return None if problem is None else f"{problem}; allowed only with --webhook-allow-private"


class GuardedResolver(AbstractResolver):
    """Resolves names (in a thread, as aiohttp's default resolver does) and refuses them
    when any address they resolve to is not allowed: a name with one private address
    among public ones could be made to land on it."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for result in results:
                problem = address_problem(ipaddress.ip_address(result["host"]))
                if problem is not None:
                    raise TargetRefused(
                        f"refused: {host} resolves to {problem} (allowed only with "
                        "--webhook-allow-private)"
                    )
        return results

    async def close(self) -> None:
        await self._inner.close()


def connector_options(allow_private: bool) -> dict[str, Any]:
    """The TCPConnector settings of the deliverer's HTTP client."""
    return {"resolver": GuardedResolver(allow_private=allow_private), "limit_per_host": 8}
