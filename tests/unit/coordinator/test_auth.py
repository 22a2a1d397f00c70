"""Authentication, pure (coordinator/auth.py): what each bad key gets, that no refusal
repeats what the caller sent, the per-peer throttle, and streams ended by their key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from conveyor.coordinator.audit.appender import AuditLog
from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.errors import QuotaExceeded, Unauthenticated
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.coordinator.tenancy.auth import (
    Authenticator,
    FailureLimiter,
    Identity,
    OpenStreams,
    peer_host,
)
from conveyor.coordinator.tenancy.directory import CachedKey, Directory

HOST = "10.1.2.3"
"""The address of the calls here (``auth.peer_host`` of the peer gRPC reports)."""


class FakeAudit:
    def __init__(self) -> None:
        self.tallied: list[Event] = []

    def tally(self, event: Event) -> None:
        self.tallied.append(event)


class FakeDirectory:
    def __init__(self) -> None:
        self.keys: dict[str, CachedKey] = {}


def _key(tenant: str = "acme", *, scopes: tuple[str, ...] = ("read",), **kw: Any) -> str:
    key_id, key = api_keys.generate()
    DIRECTORY.keys[key_id] = CachedKey(
        id=key_id,
        secret_hash=api_keys.secret_hash(key),
        tenant=tenant,
        scopes=frozenset(scopes),
        expire_at=kw.get("expire_at"),
        revoked=kw.get("revoked", False),
    )
    return key


DIRECTORY = FakeDirectory()


def _authenticator(burst: int = 0) -> tuple[Authenticator, FakeAudit]:
    audit = FakeAudit()
    auth = Authenticator(
        cast(Directory, DIRECTORY), cast(AuditLog, audit), FailureLimiter(1.0, burst)
    )
    return auth, audit


def _refusal(auth: Authenticator, metadata: list[tuple[str, Any]]) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        auth.authenticate(metadata, HOST, "/conveyor.v1.TaskService/GetTask", "r1")
    return caught.value


def test_a_good_key_gives_its_tenant_and_scopes() -> None:
    key = _key("acme", scopes=("submit", "read"))
    auth, audit = _authenticator()
    for scheme in ("Bearer", "bearer", "BEARER"):
        identity = auth.authenticate(
            [("x-request-id", "r"), ("authorization", f"{scheme} {key}")], HOST, "/m", "r"
        )
        assert identity.tenant == "acme" and identity.scopes == {"submit", "read"}
        assert identity.key_id == api_keys.parse(key)
    assert audit.tallied == []


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ([], "missing"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "malformed"),
        ([("authorization", "Bearer")], "malformed"),
        ([("authorization", "Bearer not-a-key")], "malformed"),
        ([("authorization", "Bearer " + "x" * 10_000)], "malformed"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "malformed"),
        ([("authorization", b"\x00binary")], "malformed"),
    ],
)
def test_missing_and_malformed(metadata: list[tuple[str, Any]], problem: str) -> None:
    auth, audit = _authenticator()
    error = _refusal(auth, metadata)
    assert error.problem == problem
    # Each says what to send instead.
    assert "authorization: Bearer <key>" in error.message or "cvk_<id>_<secret>" in error.message
    (event,) = audit.tallied
    assert (event.action, event.outcome, event.peer) == (
        "authentication_failed",
        "UNAUTHENTICATED",
        "10.1.2.3",
    )
    assert event.detail == f"problem={problem}"


def test_unknown_id_and_wrong_secret_are_the_same_answer() -> None:
    key = _key()
    auth, _ = _authenticator()
    key_id = api_keys.parse(key)
    _, other = api_keys.generate()
    wrong_secret = f"cvk_{key_id}_{other.split('_', 2)[2]}"
    unknown = _refusal(auth, [("authorization", f"Bearer {other}")])
    mismatch = _refusal(auth, [("authorization", f"Bearer {wrong_secret}")])
    assert (unknown.problem, unknown.message, unknown.metadata) == (
        mismatch.problem,
        mismatch.message,
        mismatch.metadata,
    )
    assert unknown.problem == "unknown" and "key_id" not in unknown.metadata


def test_expired_and_revoked_name_the_key() -> None:
    auth, audit = _authenticator()
    expired = _key(expire_at=time.time() - 1)
    revoked = _key("globex", revoked=True)
    error = _refusal(auth, [("authorization", f"Bearer {expired}")])
    assert error.problem == "expired" and error.metadata["key_id"] == api_keys.parse(expired)
    error = _refusal(auth, [("authorization", f"Bearer {revoked}")])
    assert error.problem == "revoked" and "revoked" in error.message
    assert audit.tallied[-1].tenant == "globex"  # the failure is filed under its tenant
    later = _key(expire_at=time.time() + 60)  # not expired yet: it works
    assert auth.authenticate([("authorization", f"Bearer {later}")], HOST, "/m", "r").expire_at


def test_no_refusal_repeats_what_was_sent() -> None:
    key = _key()
    secret = key.split("_", 2)[2]
    auth, audit = _authenticator()
    cases = [
        [("x-api-key", key)],  # the wrong header
        [("authorization", key)],  # no scheme
        [("authorization", f"Bearer https://example.com/hook?api_key={key}")],  # in a URL
        [("authorization", f"Bearer {key}x")],
        [("authorization", f"Token {key}")],
    ]
    for metadata in cases:
        error = _refusal(auth, metadata)
        assert secret not in error.message and secret not in str(error.metadata)
    for event in audit.tallied:
        assert secret not in repr(event)
    wrong_header = _refusal(auth, [("x-api-key", key)])
    assert "'x-api-key'" in wrong_header.message and wrong_header.problem == "missing"


def test_a_peer_that_keeps_failing_is_throttled_and_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    auth, audit = _authenticator(burst=3)
    good = _key(scopes=("read",))
    for _ in range(3):
        _refusal(auth, [])
    # Throttled now: even a good key is refused unchecked (checking would let it guess on).
    with pytest.raises(QuotaExceeded) as caught:
        auth.authenticate([("authorization", f"Bearer {good}")], HOST, "/m", "r")
    assert caught.value.subject == "failed_authentications"
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 1
    assert audit.tallied[-1].action == "authentication_throttled"
    # Another peer is not affected.
    auth.authenticate([("authorization", f"Bearer {good}")], "10.9.9.9", "/m", "r")
    now[0] += 1.0  # one token back
    auth.authenticate([("authorization", f"Bearer {good}")], HOST, "/m", "r")


def test_the_limiter_forgets_the_least_recent_peer_first() -> None:
    limiter = FailureLimiter(1.0, 1, max_peers=2)
    for host in ("a", "b", "c"):
        limiter.failed(host)
    assert limiter.retry_after("a") is None  # forgotten
    assert limiter.retry_after("c") is not None
    assert FailureLimiter(1.0, 0).retry_after("x") is None  # off


async def _peers_seen(targets: dict[str, str], connections: int) -> dict[str, list[str]]:
    """What ``context.peer()`` says, per listening address, for calls made over
    ``connections`` separate connections to each: gRPC's own peer strings."""
    seen: dict[str, list[str]] = {}
    current = ""

    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.setdefault(current, []).append(context.peer())
        return b""

    server = grpc.aio.server()
    method: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {"M": method})])
    dial = {name: target for name, target in targets.items()}
    for name, target in targets.items():
        port = server.add_insecure_port(target)
        if target.endswith(":0"):
            dial[name] = f"{target[:-2]}:{port}"
    await server.start()
    try:
        for name, target in dial.items():
            current = name
            for _ in range(connections):
                # A channel of its own subchannel pool: a connection of its own.
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(target, options=options) as channel:
                    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                        "/t.S/M"
                    )
                    await call(b"", timeout=10)
    finally:
        await server.stop(None)
    return seen


async def test_peer_host_of_real_connections_is_one_per_host(tmp_path: Path) -> None:
    targets = {
        "ipv4": "127.0.0.1:0",
        "ipv6": "[::1]:0",
        "unix": f"unix:{tmp_path}/conveyor test%.sock",
        "unix-abstract": "unix-abstract:conveyor test %",
    }
    seen = await _peers_seen(targets, connections=3)
    # Each connection has a peer string of its own (its port)...
    assert len(set(seen["ipv4"])) == len(set(seen["ipv6"])) == 3, seen
    # ... and every connection from one host the same address: the throttle's bucket.
    hosts = {name: {peer_host(peer) for peer in peers} for name, peers in seen.items()}
    assert hosts == {
        "ipv4": {"127.0.0.1"},
        "ipv6": {"::1"},
        # A client's unix socket is unnamed: every local caller is one peer.
        "unix": {"unix:"},
        "unix-abstract": {"unix:"},
    }, seen


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        # Forms gRPC core writes (sockaddr_utils.cc) that this machine cannot produce: a
        # zone (its "%" encoded too), a named client socket, vsock, an older gRPC's
        # unencoded brackets, and a peer without a scheme.
        ("ipv6:%5Bfe80::1%252%5D:5555", "fe80::1%2"),
        ("ipv6:%5B2001:db8::7%5D:1", "2001:db8::7"),
        ("unix:/run/my%20app.sock", "unix:/run/my app.sock"),
        ("unix-abstract:name%00x", "unix-abstract:name\x00x"),
        ("vsock:3:5555", "vsock:3"),
        ("ipv6:[::1]:5555", "::1"),
        ("something-else", "something-else"),
    ],
)
def test_peer_host_of_other_forms(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# -- streams ended by their key ----------------------------------------------------------------


def _identity(key_id: str, expire_at: float | None = None) -> Identity:
    return Identity(key_id, "acme", frozenset({"read"}), expire_at)


def _cached(key_id: str, *, revoked: bool = False, expire_at: float | None = None) -> CachedKey:
    return CachedKey(key_id, b"", "acme", frozenset({"read"}), expire_at, revoked)


async def test_a_revoked_key_ends_its_streams_and_lets_them_clean_up() -> None:
    streams = OpenStreams()
    cleaned = asyncio.Event()

    async def handler() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()
        return "never"

    running = asyncio.create_task(streams.run(_identity("k1"), handler))
    other = asyncio.create_task(streams.run(_identity("k2"), handler))
    await asyncio.sleep(0)
    assert len(streams) == 2
    streams.key_changed("k1", _cached("k1", revoked=True))
    with pytest.raises(Unauthenticated) as caught:
        await running
    assert caught.value.problem == "revoked" and cleaned.is_set()
    assert len(streams) == 1 and not other.done()
    streams.key_changed("k2", None)  # deleted: as revoked
    with pytest.raises(Unauthenticated):
        await other
    assert len(streams) == 0


async def test_an_expiring_key_ends_its_stream_at_its_expiry() -> None:
    streams = OpenStreams()

    async def handler() -> str:
        await asyncio.Event().wait()
        return "never"

    started = time.time()
    with pytest.raises(Unauthenticated) as caught:
        await streams.run(_identity("k1", expire_at=started + 0.2), handler)
    assert caught.value.problem == "expired"
    assert 0.15 <= time.time() - started < 1.0


async def test_a_later_expiry_moves_the_timer() -> None:
    streams = OpenStreams()
    done = asyncio.Event()

    async def handler() -> str:
        await done.wait()
        return "finished"

    task = asyncio.create_task(streams.run(_identity("k1", expire_at=time.time() + 0.2), handler))
    await asyncio.sleep(0)
    streams.key_changed("k1", _cached("k1", expire_at=time.time() + 60))
    await asyncio.sleep(0.4)
    assert not task.done()
    done.set()
    assert await task == "finished"


async def test_a_stream_that_ends_by_itself_returns_its_result_or_error() -> None:
    streams = OpenStreams()

    async def fine() -> str:
        return "ok"

    async def broken() -> str:
        raise ValueError("boom")

    assert await streams.run(_identity("k1"), fine) == "ok"
    with pytest.raises(ValueError, match="boom"):
        await streams.run(_identity("k1"), broken)
    assert len(streams) == 0


async def test_cancelling_the_call_cancels_the_handler() -> None:
    streams = OpenStreams()
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler() -> str:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    task = asyncio.create_task(streams.run(_identity("k1"), handler))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and len(streams) == 0


async def test_a_stream_runs_in_the_calling_task() -> None:
    # No task of its own per stream (issue 19): the handler runs in gRPC's task for the
    # call, which a key that stops working cancels.
    streams = OpenStreams()

    async def handler() -> asyncio.Task[object] | None:
        return asyncio.current_task()

    caller = asyncio.current_task()
    assert await streams.run(_identity("k1"), handler) is caller


async def test_a_revoked_key_during_the_calls_own_cancellation_leaves_it_cancelled() -> None:
    streams = OpenStreams()
    started = asyncio.Event()

    async def handler() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(streams.run(_identity("k1"), handler))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()  # the peer went away
    streams.key_changed("k1", None)  # and the key was deleted in the same turn
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(streams) == 0


async def test_a_handler_that_finishes_as_its_key_is_revoked_returns_its_result() -> None:
    streams = OpenStreams()
    started = asyncio.Event()

    async def handler() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "finished just then"
        return "never"

    task = asyncio.create_task(streams.run(_identity("k1"), handler))
    await asyncio.wait_for(started.wait(), 5)
    streams.key_changed("k1", _cached("k1", revoked=True))
    assert await task == "finished just then"
    assert task.cancelling() == 0
