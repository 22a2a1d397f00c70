"""Who is signed in: sessions, one-time sign-in links and the sign-in throttle.

The API key stays on the server, inside the session's client; the browser holds only the
session's id, 256 random bits in an HttpOnly, SameSite=Strict cookie. A session ends at
sign-out, after :attr:`SessionPolicy.idle` without a request, after
:attr:`SessionPolicy.lifetime` in any case, when the coordinator stops accepting its key,
or when :attr:`SessionPolicy.capacity` newer sessions push it out. Each session has its
own CSRF token, which every form of its pages carries and every POST must send back.

Nothing here does I/O: ending a session hands its client back to the caller to close, and
time comes from a clock the tests can drive.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "Flash",
    "Session",
    "SessionPolicy",
    "SessionStore",
    "SignInLinks",
    "Throttle",
    "new_token",
    "same_token",
]

C = TypeVar("C")
Clock = Callable[[], float]


def new_token() -> str:
    """A fresh random token: 256 bits, URL- and cookie-safe."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str) -> bool:
    """Whether ``given`` is ``expected``, in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long sessions last, and how many there may be."""

    #: Seconds without a request after which a session ends.
    idle: float = 3600.0
    #: Seconds after sign-in after which a session ends, however busy.
    lifetime: float = 12 * 3600.0
    #: Most sessions at once; a new one ends the one used least recently.
    capacity: int = 1000

    def __post_init__(self) -> None:
        if self.idle <= 0 or self.lifetime <= 0 or self.capacity < 1:
            raise ValueError(f"session idle, lifetime and capacity must be positive: {self}")


@dataclass(frozen=True, slots=True)
class Flash:
    """A message for the next page the session sees (what an action did, or why not)."""

    text: str
    error: bool = False


@dataclass(slots=True, eq=False)
class Session(Generic[C]):
    """One signed-in browser."""

    #: The cookie's value.
    id: str
    #: The token every form carries and every POST must send back.
    csrf: str
    #: The session's API client, holding its key.
    client: C
    #: The key's id (never its secret), or "" without a key (a coordinator without keys).
    key_id: str
    created: float
    last_seen: float
    flashes: list[Flash] = field(default_factory=list)
    #: Pages the coordinator refused for lack of a scope ("admin"), so links to them hide.
    denied: set[str] = field(default_factory=set)

    def flash(self, text: str, *, error: bool = False) -> None:
        """Says ``text`` on the next page (at most a few messages are kept)."""
        self.flashes = [*self.flashes[-4:], Flash(text, error)]

    def take_flashes(self) -> list[Flash]:
        """The messages to show now; they are shown once."""
        flashes, self.flashes = self.flashes, []
        return flashes


class SessionStore(Generic[C]):
    """The sessions by id (see the module docstring for when they end)."""

    def __init__(self, policy: SessionPolicy, *, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # Least recently used first, so the one to push out is at the front.
        self._sessions: OrderedDict[str, Session[C]] = OrderedDict()
        # Clients of sessions found expired on use, for :meth:`expired` to hand over.
        self._retired: list[C] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, client: C, key_id: str) -> tuple[Session[C], list[C]]:
        """A new session for ``client``, and the clients of the sessions it pushed out."""
        now = self._clock()
        session = Session(new_token(), new_token(), client, key_id, now, now)
        self._sessions[session.id] = session
        ended: list[C] = []
        while len(self._sessions) > self.policy.capacity:
            _, oldest = self._sessions.popitem(last=False)
            ended.append(oldest.client)
        return session, ended

    def get(self, session_id: str | None) -> Session[C] | None:
        """The live session with this id, now marked as used; None when there is none (or
        it has just expired: it ends, and :meth:`expired` hands its client over)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._over(session, self._clock()):
            del self._sessions[session_id]
            self._retired.append(session.client)
            return None
        session.last_seen = self._clock()
        self._sessions.move_to_end(session_id)
        return session

    def alive(self, session: Session[C]) -> bool:
        """Whether ``session`` is still signed in (not ended, not expired); for the live
        streams, which check between their updates without counting as use."""
        return self._sessions.get(session.id) is session and not self._over(session, self._clock())

    def end(self, session_id: str) -> C | None:
        """Ends a session (sign-out, key refused); its client, to close, or None."""
        session = self._sessions.pop(session_id, None)
        return None if session is None else session.client

    def expired(self) -> list[C]:
        """Ends every expired session; their clients, to close."""
        now = self._clock()
        over = [s for s in self._sessions.values() if self._over(s, now)]
        for session in over:
            del self._sessions[session.id]
        retired, self._retired = self._retired, []
        return retired + [s.client for s in over]

    def clear(self) -> list[C]:
        """Ends every session (the console stops); their clients, to close."""
        clients = self._retired + [s.client for s in self._sessions.values()]
        self._sessions.clear()
        self._retired = []
        return clients

    def _over(self, session: Session[C], now: float) -> bool:
        return (
            now - session.last_seen > self.policy.idle
            or now - session.created > self.policy.lifetime
        )


class SignInLinks:
    """One-time sign-in links (``/sign-in?token=...``), as ``conveyor dev`` prints: each
    token signs one browser in with the key it was made for, once, within ``ttl``."""

    def __init__(self, *, ttl: float = 24 * 3600.0, clock: Clock = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._tokens: dict[str, tuple[str | None, float]] = {}

    def issue(self, api_key: str | None) -> str:
        """A new token for ``api_key`` (None: a coordinator that takes no keys)."""
        now = self._clock()
        self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
        token = new_token()
        self._tokens[token] = (api_key, now + self._ttl)
        return token

    def redeem(self, token: str) -> tuple[bool, str | None]:
        """``(True, key)`` the first time a live token is used; ``(False, None)`` after."""
        for known, (key, until) in list(self._tokens.items()):
            if same_token(token, known):
                del self._tokens[known]
                return (until > self._clock(), key)
        return (False, None)


class Throttle:
    """A token bucket: ``burst`` at once, then one more every ``1 / rate`` seconds.

    Failed sign-ins spend from it. The console checks keys with the coordinator as one
    client, from one address; the coordinator throttles an address after 30 failures in a
    row (and then refuses *every* call from it, good keys included), so the console keeps
    its own failures well below that, whoever sends them.
    """

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def wait(self) -> float:
        """Seconds until one token is there (0 when one is now)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def spend(self) -> None:
        """Takes one token, before the attempt (so attempts made at once all count)."""
        self._refill()
        self._tokens -= 1

    def refund(self) -> None:
        """Gives back the token of an attempt that succeeded."""
        self._refill()
        self._tokens = min(self._burst, self._tokens + 1)
