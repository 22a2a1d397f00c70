"""Authentication: who a call is, from its ``authorization: Bearer <key>`` metadata.

:class:`Authenticator` checks a call's key against the in-memory cache of
``directory.py`` (one dict lookup by the key's id, one SHA-256, a constant-time compare):
once per call or stream, never per task. What it refuses, and how:

- no key, a malformed one, one this cluster does not know (or whose secret does not
  match: the same answer, so a key id alone tells nothing), an expired or a revoked one:
  UNAUTHENTICATED, reason UNAUTHENTICATED, metadata ``problem``. The message never
  repeats what the caller sent: a key in the wrong header, or inside a URL, is still a
  secret, and messages end up in logs. A key found in another metadata entry is named by
  the entry's name only.
- a peer (by address, without the port) that failed more than ``auth_failure_burst``
  times, at more than ``auth_failure_rate`` a second: every call from it is refused
  unchecked, RESOURCE_EXHAUSTED with QuotaFailure ``failed_authentications`` and
  RetryInfo, until it is back under the rate. Unchecked on purpose: checking would still
  let it try keys. (Behind a proxy every caller has the proxy's address; raise the limits
  or turn them off with ``auth_failure_burst=0`` there.)

Every failure is tallied into the audit log (``audit/appender.py`` aggregates them: one row per
peer, problem and key a second, with a count), never one row per attempt.

:class:`OpenStreams` ends the open streams (WatchTask, worker Connect) of a key that is
revoked (or deleted) or that expires, with UNAUTHENTICATED: a revocation reaches it from
the directory within a second of its commit; an expiry is a timer at the key's
``expire_time``.
"""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor.coordinator.audit.appender import (
    AUTHENTICATION_FAILED,
    AUTHENTICATION_THROTTLED,
    PERMISSION_DENIED,
    AuditLog,
)
from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.errors import PermissionDenied, QuotaExceeded, Unauthenticated
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.coordinator.tenancy.directory import CachedKey, Directory

T = TypeVar("T")

AUTHORIZATION = "authorization"
BEARER = "bearer "
MAX_PEERS = 10_000
"""Peers whose failures are remembered at once (least recently failed forgotten first)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call is: its key's id, tenant and scopes."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    expire_at: float | None


def peer_host(peer: str) -> str:
    """The address of a gRPC peer without its port: one per host, whatever the connection.

    gRPC core writes a peer as a URI (``grpc_sockaddr_to_uri``), percent-encoding what a
    URI path may not hold: ``ipv4:10.0.0.7:5123``, ``ipv6:%5B::1%5D:5123`` (a zone as
    ``%5Bfe80::1%252%5D``), ``unix:/run/s.sock`` (``unix:`` for a client's unnamed
    socket), ``unix-abstract:name``, ``vsock:3:5123``; older versions wrote
    ``ipv6:[::1]:5123``, and IPv4-mapped IPv6 peers are written as IPv4. IPv4 and IPv6
    peers give the bare address (``10.0.0.7``, ``::1``); every other form keeps its scheme
    and loses a trailing ``:PORT`` (``unix:``, ``vsock:3``), and one without a scheme is
    taken whole.
    """
    scheme, colon, rest = peer.partition(":")
    if not colon:
        return peer
    address = urllib.parse.unquote(rest) if "%" in rest else rest
    if scheme in ("unix", "unix-abstract"):
        return f"{scheme}:{address}"  # a path, not host and port
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit():
        address = host
    if address[:1] == "[" and address[-1:] == "]":
        address = address[1:-1]
    return address if scheme in ("ipv4", "ipv6") else f"{scheme}:{address}"


class FailureLimiter:
    """A token bucket of failed authentications per peer address; see the module docstring."""

    def __init__(self, rate: float, burst: int, *, max_peers: int = MAX_PEERS) -> None:
        self.rate = rate
        self.burst = burst
        self._max_peers = max_peers
        # host -> [tokens, time of the last update]; ordered by last failure.
        self._peers: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.burst > 0 and self.rate > 0

    def _tokens(self, host: str, now: float) -> list[float] | None:
        state = self._peers.get(host)
        if state is not None:
            state[0] = min(float(self.burst), state[0] + (now - state[1]) * self.rate)
            state[1] = now
        return state

    def retry_after(self, host: str) -> float | None:
        """Seconds until ``host`` may try again; None when it may now."""
        if not self.enabled:
            return None
        state = self._tokens(host, time.monotonic())
        if state is None or state[0] >= 1:
            return None
        return (1 - state[0]) / self.rate

    def failed(self, host: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        state = self._tokens(host, now)
        if state is None:
            if len(self._peers) >= self._max_peers:
                self._peers.popitem(last=False)
            state = self._peers[host] = [float(self.burst), now]
        state[0] = max(0.0, state[0] - 1)
        self._peers.move_to_end(host)


class Authenticator:
    """Checks calls' keys against the directory's cache; see the module docstring."""

    def __init__(self, directory: Directory, audit: AuditLog, limiter: FailureLimiter) -> None:
        self._keys = directory.keys
        self._audit = audit
        self.limiter = limiter

    def authenticate(
        self, metadata: Iterable[tuple[str, Any]], host: str, method: str, request_id: str
    ) -> Identity:
        """The identity of a call from ``host`` (the peer's address, :func:`peer_host`),
        or raises Unauthenticated (or QuotaExceeded for a throttled peer)."""
        wait = self.limiter.retry_after(host)
        if wait is not None:
            self._audit.tally(Event.make(
                tenant="", key_id="", action=AUTHENTICATION_THROTTLED, target=method,
                outcome="QUOTA_EXCEEDED", peer=host,
            ))  # fmt: skip
            raise QuotaExceeded(
                "failed_authentications",
                f"too many failed authentications from {host}; calls from it are refused "
                f"for {wait:.1f}s",
                retry_after=wait,
            )
        values: list[str] = []
        elsewhere = ""
        for name, value in metadata:
            if name == AUTHORIZATION:
                values.append(value if isinstance(value, str) else "")
            elif not elsewhere and isinstance(value, str) and api_keys.looks_like_key(value):
                elsewhere = name
        try:
            return self._check(values, elsewhere)
        except Unauthenticated as exc:
            self.limiter.failed(host)
            known = self._keys.get(exc.metadata.get("key_id", ""))
            self._audit.tally(Event.make(
                tenant=known.tenant if known else "", key_id=exc.metadata.get("key_id", ""),
                action=AUTHENTICATION_FAILED, target=method, outcome="UNAUTHENTICATED",
                peer=host, request_id=request_id, detail=f"problem={exc.problem}",
            ))  # fmt: skip
            raise

    def _check(self, values: list[str], elsewhere: str) -> Identity:
        how = "send it as metadata 'authorization: Bearer <key>'"
        if not values:
            found = f" (a key-like value was found in metadata {elsewhere!r}, which is not read)"
            raise Unauthenticated("missing", f"no API key: {how}{found if elsewhere else ''}")
        if len(values) > 1:
            raise Unauthenticated("malformed", f"more than one authorization entry; {how}")
        value = values[0]
        if value[: len(BEARER)].lower() != BEARER:
            raise Unauthenticated(
                "malformed", f"the authorization entry is not of the Bearer scheme; {how}"
            )
        token = value[len(BEARER) :].strip()
        key_id = api_keys.parse(token)
        if key_id is None:
            raise Unauthenticated(
                "malformed",
                "the bearer token is not a Conveyor API key (cvk_<id>_<secret>, exactly as "
                "it was shown when created)",
            )
        key = self._keys.get(key_id)
        if key is None or not api_keys.secret_matches(token, key.secret_hash):
            raise Unauthenticated("unknown", "this API key is not known to the cluster")
        problem = key.problem(time.time())
        if problem is not None:
            raise Unauthenticated(
                problem,
                f"API key {key_id} was {problem}; ask an admin for a new one",
                key_id=key_id,
            )
        return Identity(key.id, key.tenant, key.scopes, key.expire_at)

    def denied(self, identity: Identity, method: str, scope: str, host: str) -> PermissionDenied:
        """The refusal of a call from ``host`` whose key lacks ``scope`` (tallied in the
        audit log)."""
        self._audit.tally(Event.make(
            tenant=identity.tenant, key_id=identity.key_id, action=PERMISSION_DENIED,
            target=method, outcome="PERMISSION_DENIED", peer=host,
            detail=f"scope={scope}",
        ))  # fmt: skip
        return PermissionDenied(identity.key_id, scope, method.rsplit("/", 1)[-1])


@dataclass(eq=False)
class _Stream:
    key_id: str
    task: asyncio.Task[Any]
    """The task running the stream's handler: cancelled when the key stops working."""
    problem: str | None = None
    """Why the key stopped working (set when the stream is ended for it)."""
    timer: asyncio.TimerHandle | None = None


class OpenStreams:
    """The open streams of each key, ended when the key stops working."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[_Stream]] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_key.values())

    def key_changed(self, key_id: str, key: CachedKey | None) -> None:
        """The directory's listener: ends the key's streams if it no longer works, else
        moves their expiry timers to its (new) expiry."""
        streams = self._by_key.get(key_id)
        if not streams:
            return
        problem = "revoked" if key is None else key.problem(time.time())
        for stream in list(streams):
            if problem is not None:
                self._end(stream, problem)
            else:
                assert key is not None
                self._arm(stream, key.expire_at)

    def _arm(self, stream: _Stream, expire_at: float | None) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if expire_at is not None:
            delay = max(0.0, expire_at - time.time())
            stream.timer = asyncio.get_running_loop().call_later(
                delay, self._end, stream, "expired"
            )

    def _end(self, stream: _Stream, problem: str) -> None:
        if stream.problem is None:
            stream.problem = problem
            stream.task.cancel()

    async def run(self, identity: Identity, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Runs ``call()`` (a stream handler) until it ends or the key stops working; then
        cancels it, lets it finish (its own clean-up runs) and raises Unauthenticated.

        The handler runs in the calling task (gRPC's task for the call), which a key
        that stops working cancels, as ``asyncio.timeout`` does: a task, its coroutine and
        a wait less per stream than running it in a task of its own (issue 19). A
        cancellation of the call itself (its peer gone) is told apart by the task's count
        of cancellation requests, and passes through.
        """
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(identity.key_id, task)
        self._by_key.setdefault(identity.key_id, set()).add(stream)
        self._arm(stream, identity.expire_at)
        try:
            result = await call()
        except BaseException as exc:
            # Ours only if no one else asked for the task's cancellation too. A handler
            # that failed otherwise on its way out was ended for the key all the same.
            if stream.problem is not None and task.uncancel() == 0:
                raise Unauthenticated(
                    stream.problem,
                    f"API key {stream.key_id} was {stream.problem}: this stream ends",
                    key_id=stream.key_id,
                ) from (None if isinstance(exc, asyncio.CancelledError) else exc)
            raise
        else:
            if stream.problem is not None:
                task.uncancel()  # it finished just then: the cancellation is spent
            return result
        finally:
            if stream.timer is not None:
                stream.timer.cancel()
            streams = self._by_key.get(identity.key_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._by_key[identity.key_id]
