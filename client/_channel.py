"""Channels to the coordinators, and the rules for failing over between them.

Rules (the only place they are written down in code):

* Addresses are tried in order, starting from the one that last answered (usually the
  leader), so a healthy cluster costs no extra round trips.
* ``UNAVAILABLE`` with reason ``NOT_LEADER`` means the request was refused before anything
  was written. Any call, even a submit without idempotency key, is resent to the
  ``leader_address`` from the error (or to the next address while the leader is unknown),
  at most ``_MAX_REDIRECTS`` times, after a short backoff.
* Before a call is sent, the channel must be connected. An address that cannot be
  connected to is skipped: nothing was sent, so any call may move on.
* Once sent, a call that fails with a plain ``UNAVAILABLE`` (no ErrorInfo: the connection
  broke) may or may not have reached the server. Only calls marked idempotent (reads,
  watches, submits carrying an idempotency key) are resent, to the next address, for at
  most ``_MAX_ROUNDS`` passes over all addresses. Everything else raises.
* Every other error is raised at once, converted by ``error_from_rpc``.
* All retries of one call share its deadline: the client's ``timeout`` bounds the whole
  call, not each attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc import aio

from conveyor.client._errors import (
    DeadlineExceededError,
    NotLeaderError,
    RPCError,
    UnavailableError,
    error_from_rpc,
)
from conveyor.v1 import task_service_pb2_grpc

if TYPE_CHECKING:
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub

T = TypeVar("T")

# Redirects a call follows before giving up: a leader change needs one, an election in
# progress a few more; more than that means the cluster cannot settle and the caller
# should hear about it.
_MAX_REDIRECTS = 4
# Passes over all addresses for idempotent calls hit by connection failures.
_MAX_ROUNDS = 3
# Backoff between redirects and between passes: short, since a leader change takes
# etcd a lease TTL at most and a restarted coordinator comes back in well under a second.
_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 1.0
# How long one address may take to connect before the next is tried, when there is a
# next one. A lone address gets the whole deadline instead.
_CONNECT_TIMEOUT = 3.0
# gRPC keeps a channel that failed to connect in TRANSIENT_FAILURE until it is READY
# again ("sticky" failure), so a patient pass cannot wait for a state change that ends
# the attempt; it waits long enough for one reconnect attempt (the reconnect backoff
# below is capped at 1s) and then moves on.
_PATIENT_WAIT = 1.5

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # gRPC's default reconnect backoff grows to 120s, so a coordinator restart could
    # leave a client refusing calls for minutes; cap it near the failover timescale.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A page of 1000 tasks with large payloads or results exceeds the 4 MiB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]

StubMethod = Callable[["TaskServiceAsyncStub"], Any]


def parse_addresses(coordinators: str | Sequence[str]) -> list[str]:
    """Accepts ``"host:port"``, ``"h1:p1,h2:p2"`` or a sequence of addresses."""
    raw = coordinators.split(",") if isinstance(coordinators, str) else list(coordinators)
    addresses = [a.strip() for a in raw if a and a.strip()]
    if not addresses:
        raise ValueError(
            "no coordinator address given: pass 'host:port' or a list of them "
            "(for example '127.0.0.1:50051')"
        )
    # Order matters (it is the failover order); duplicates would only waste attempts.
    return list(dict.fromkeys(addresses))


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """The pause before retry number ``attempt`` (1-based), honouring RetryInfo if shorter."""
    delay = min(_BACKOFF_MAX, _BACKOFF_BASE * 2.0 ** (attempt - 1))
    if retry_after is not None:
        # The server knows better when it wants to be asked again, but never wait longer
        # than our own cap inside a call: the caller's deadline is the real bound.
        delay = min(max(retry_after, 0.0), _BACKOFF_MAX)
    return delay


class Connection:
    """The channels to every known coordinator, and the failover loop over them."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float | None,
        api_key: str | None = None,
    ) -> None:
        self.addresses = list(addresses)
        self.timeout = timeout
        # The address that answered last; calls start there.
        self.current = self.addresses[0]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        # Channels are created lazily, inside the running event loop that will use them.
        # Redirect targets outside `addresses` get channels too; there are few of them.
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, TaskServiceAsyncStub] = {}
        self._closed = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call (the API key)."""
        return self._metadata

    def stub(self, address: str) -> TaskServiceAsyncStub:
        """The TaskService stub for one address, opening its channel on first use."""
        stub = self._stubs.get(address)
        if stub is None:
            # The generated stub's overloads type it as the async stub for an aio channel.
            stub = task_service_pb2_grpc.TaskServiceStub(self._channel(address))
            self._stubs[address] = stub
        return stub

    def _channel(self, address: str) -> aio.Channel:
        if self._closed:
            raise RuntimeError("the Conveyor client is closed; create a new one")
        channel = self._channels.get(address)
        if channel is None:
            channel = aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Closes every channel; in-flight calls are cancelled."""
        self._closed = True
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()

    def _next_address(self, address: str) -> str:
        # A redirect target that is not configured falls back to the first configured one.
        if address not in self.addresses:
            return self.addresses[0]
        return self.addresses[(self.addresses.index(address) + 1) % len(self.addresses)]

    def deadline(self) -> float | None:
        """The loop time by which a call started now must finish."""
        if self.timeout is None:
            return None
        return asyncio.get_running_loop().time() + self.timeout

    async def unary(
        self,
        method: StubMethod,
        request: Any,
        *,
        idempotent: bool,
    ) -> Any:
        """Makes one unary call with failover; raises RPCError subclasses."""

        async def attempt(stub: TaskServiceAsyncStub, remaining: float | None) -> Any:
            return await method(stub)(request, timeout=remaining, metadata=self._metadata)

        result, _ = await self.call(attempt, idempotent=idempotent, deadline=self.deadline())
        return result

    async def stream(self, method: StubMethod, request: Any) -> AsyncGenerator[Any, None]:
        """Opens a server stream with failover, then yields its messages.

        Failover covers opening the stream and reading its first message, bounded by the
        client's timeout; after that the stream runs without deadline and a broken stream
        raises (the caller decides whether to reopen it).
        """

        async def attempt(stub: TaskServiceAsyncStub, remaining: float | None) -> Any:
            call = method(stub)(request, metadata=self._metadata)
            try:
                first = await asyncio.wait_for(call.read(), remaining)
            except BaseException:
                call.cancel()
                raise
            return call, first

        (call, first), address = await self.call(attempt, idempotent=True, deadline=self.deadline())
        try:
            message = first
            while message is not aio.EOF:
                yield message
                message = await call.read()
        except grpc.RpcError as err:
            raise error_from_rpc(err, address=address) from err
        finally:
            call.cancel()

    async def call(
        self,
        attempt: Callable[[TaskServiceAsyncStub, float | None], Awaitable[T]],
        *,
        idempotent: bool,
        deadline: float | None,
    ) -> tuple[T, str]:
        """Runs ``attempt`` against the coordinators until it succeeds or may not retry.

        Returns the result and the address that produced it.
        """
        loop = asyncio.get_running_loop()
        address = self.current
        redirects = 0
        failures = 0  # connection failures within this call, over all addresses
        last_error: RPCError | None = None
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise _deadline_error(last_error, address)
            if not await self._ready(address, remaining, patient=failures >= len(self.addresses)):
                # Never connected, so nothing was sent: safe to move on for any call.
                failures += 1
                last_error = _connect_error(address)
                address = await self._after_failure(address, failures, last_error, deadline)
                continue
            try:
                result = await attempt(self.stub(address), remaining)
            except TimeoutError:
                # Raised by asyncio.wait_for around a stream's first read.
                raise _deadline_error(last_error, address) from None
            except grpc.RpcError as err:
                error = error_from_rpc(err, address=address)
                if isinstance(error, NotLeaderError) and redirects < _MAX_REDIRECTS:
                    redirects += 1
                    address = error.leader_address or self._next_address(address)
                    await asyncio.sleep(_clamp(backoff(redirects, error.retry_after), deadline))
                    continue
                if not _is_connection_failure(error):
                    raise error from err
                if not idempotent:
                    error._append(
                        "The call was not retried because it may have reached the server "
                        "before the connection broke; give submits an idempotency_key to "
                        "make them safe to retry."
                    )
                    raise error from err
                failures += 1
                last_error = error
                address = await self._after_failure(address, failures, error, deadline)
                continue
            self.current = address
            return result, address

    async def _after_failure(
        self, address: str, failures: int, error: RPCError, deadline: float | None
    ) -> str:
        """Picks the next address after a connection failure, or raises when out of passes."""
        if failures >= len(self.addresses) * _MAX_ROUNDS:
            raise error
        if failures % len(self.addresses) == 0:
            # A full pass failed: pause before the next one instead of spinning.
            await asyncio.sleep(_clamp(backoff(failures // len(self.addresses)), deadline))
        return self._next_address(address)

    async def _ready(self, address: str, remaining: float | None, *, patient: bool) -> bool:
        """Waits until the channel to ``address`` is connected; False if it cannot connect.

        Impatient (first pass): a channel already in TRANSIENT_FAILURE is skipped at once,
        so a dead address costs nothing while others are alive. Patient (later passes):
        gives a failed channel time for one reconnect attempt.
        """
        channel = self._channel(address)
        budget = remaining
        cap = _PATIENT_WAIT if patient else _CONNECT_TIMEOUT
        if patient or len(self.addresses) > 1:
            budget = cap if budget is None else min(budget, cap)
        loop = asyncio.get_running_loop()
        until = None if budget is None else loop.time() + budget
        state = channel.get_state(try_to_connect=True)
        connecting_seen = False
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                return False
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and (
                connecting_seen or not patient
            ):
                return False
            # Seen CONNECTING fail to TRANSIENT_FAILURE: that attempt is over.
            connecting_seen |= state is grpc.ChannelConnectivity.CONNECTING
            left = None if until is None else until - loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                return False
            state = channel.get_state(try_to_connect=True)
        return True


def _is_connection_failure(error: RPCError) -> bool:
    # A plain UNAVAILABLE (no ErrorInfo) comes from gRPC itself: the connection broke or
    # could not be made. UNAVAILABLE with a reason (STORE_UNAVAILABLE) is an answer from a
    # live coordinator, and another address will not have a better store.
    return isinstance(error, UnavailableError) and error.reason is None


def _connect_error(address: str) -> UnavailableError:
    return UnavailableError(
        f"cannot connect to the coordinator at {address}. Check that it is running and "
        f"reachable from here, or pass the addresses of more coordinators.",
        code=grpc.StatusCode.UNAVAILABLE,
        address=address,
    )


def _deadline_error(last_error: RPCError | None, address: str) -> RPCError:
    if last_error is not None:
        # The deadline ran out while failing over; the failure that caused the failover
        # says more than "deadline exceeded" does.
        last_error._append("(The client's timeout ran out while trying other coordinators.)")
        return last_error
    return DeadlineExceededError(
        f"the call to {address} did not finish within the client's timeout. Raise timeout= "
        f"if the coordinator is just slow, or check its health.",
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
        address=address,
    )


def _clamp(delay: float, deadline: float | None) -> float:
    if deadline is None:
        return delay
    return max(0.0, min(delay, deadline - asyncio.get_running_loop().time()))
