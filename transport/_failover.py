"""Addresses, backoff and redirects: the failover rules shared by the client and the worker.

* A coordinator list is ``"host:port"``, ``"h1:p1,h2:p2"`` or a sequence; order is the
  failover order, duplicates are dropped.
* Work starts at the address that answered last (usually the leader), so a healthy
  cluster costs no extra round trips.
* A follower answers with the leader's address (``NOT_LEADER`` status or a ``Redirect``
  message): go there. While the leader is unknown (an election), go to the next address.
* An address that fails goes to the next one; a redirect target that is not in the list
  is tried, and failing it leads on to the address after the one that redirected (a
  leader advertising an address this process cannot reach, as in the compose file,
  is then found by trying the list in turn).
* Waits between attempts grow exponentially to a cap, with jitter over the upper half of
  each step, so that clients that lost the same coordinator do not all return at once.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

__all__ = ["AddressBook", "Backoff", "parse_addresses"]


def parse_addresses(coordinators: str | Sequence[str]) -> list[str]:
    """Accepts ``"host:port"``, ``"h1:p1,h2:p2"`` or a sequence of addresses.

    Raises:
        ValueError: No address is given, or one is not ``host:port``.
    """
    raw = coordinators.split(",") if isinstance(coordinators, str) else list(coordinators)
    addresses = [a.strip() for a in raw if isinstance(a, str) and a.strip()]
    if not addresses:
        raise ValueError(
            "no coordinator address given: pass 'host:port' or a list of them "
            "(for example '127.0.0.1:50051')"
        )
    for address in addresses:
        if "://" in address or address.startswith(("unix:", "unix-abstract:")):
            continue  # a gRPC target URI (dns:///, unix:...): gRPC checks those itself
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or any(c.isspace() for c in address):
            raise ValueError(
                f"invalid coordinator address {address!r}: expected host:port, "
                "for example '127.0.0.1:50051'"
            )
    return list(dict.fromkeys(addresses))


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: the pause before retry number ``attempt``."""

    #: The step of the first retry, in seconds.
    initial: float
    #: The cap on any step, in seconds.
    maximum: float
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError(
                f"invalid backoff {self!r}: need 0 < initial <= maximum, multiplier >= 1"
            )

    def step(self, attempt: int) -> float:
        """The upper bound of the pause before retry ``attempt`` (1-based), without jitter."""
        exponent = min(max(attempt, 1) - 1, 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """The pause before retry ``attempt`` (1-based): between half the step and the step."""
        step = self.step(attempt)
        return (rng or random).uniform(step / 2, step)


class AddressBook:
    """The configured coordinators and the one to use next."""

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address is needed")
        self.addresses = list(addresses)
        #: The address that answered last; work starts there.
        self.current = self.addresses[0]
        # The listed address that last redirected to each target outside the list.
        self._redirected_from: dict[str, str] = {}

    def next_after(self, address: str) -> str:
        """The address to try after ``address`` failed."""
        if address not in self.addresses:
            # A redirect target outside the list that failed: on after the listed address
            # that sent us there (back to it would only redirect us again).
            origin = self._redirected_from.get(address)
            return self.next_after(origin) if origin is not None else self.addresses[0]
        return self.addresses[(self.addresses.index(address) + 1) % len(self.addresses)]

    def redirect(self, leader_address: str | None, *, from_address: str) -> str:
        """Where to go after ``from_address`` said it is not the leader."""
        if not leader_address:
            return self.next_after(from_address)
        if leader_address not in self.addresses and from_address in self.addresses:
            self._redirected_from[leader_address] = from_address
        return leader_address

    def answered(self, address: str) -> None:
        """``address`` served a call: start there next time."""
        self.current = address
