"""The client's calls to the coordinators: failover, and what it resends by itself.

Rules (the only place they are written down in code; addresses, redirects and backoff
follow the shared rules of :mod:`conveyor.transport._failover`):

* Before a call is sent, the channel must be connected. An address that cannot be
  connected to is skipped: nothing was sent, so any call may move on.
* ``NOT_LEADER`` means the request was refused before anything was written: any call is
  resent where the error points, at most ``max_redirects`` times.
* ``STORE_UNAVAILABLE`` means the coordinator could not reach PostgreSQL and wrote
  nothing: any call is resent (to the same coordinator) after the server's ``RetryInfo``.
* A plain ``UNAVAILABLE`` once the call was sent (no ErrorInfo: the connection broke) and
  ``OUTCOME_UNKNOWN`` (the store broke while committing) may or may not have been applied.
  Only idempotent calls are resent: reads, watches, and submits carrying an idempotency
  key (the client gives each submit one of its own unless told not to). Anything else
  raises, saying why it was not resent.
* ``RESOURCE_EXHAUSTED`` (``OVERLOADED``, ``QUOTA_EXCEEDED``: nothing written) is resent
  after the server's ``RetryInfo``: for submits by default, when the refusal carries one
  (backpressure: a submit waits its turn within the timeout instead of failing); for every
  call with ``retry_resource_exhausted=True``; never with ``False``.
* Every other error is raised at once, converted by the error catalog.
* Spreading: a call any coordinator answers alike (``SPREAD`` in
  :mod:`conveyor.transport._routing`: submits and reads of PostgreSQL) starts at one of the
  connected coordinators, the one with the fewest of this client's calls in flight, in
  turn among equals; a stream stays on the one it opened on. Every other call starts at
  the address that answered such a call last (usually the leader, after its redirect),
  and spread calls do not move it. Failover is the same for both.
* All retries of one call share its deadline: the client's ``timeout`` bounds the whole
  call. A wait the server asks for that would end past the deadline is not started: the
  error is raised at once. Without a deadline, answered retries stop after
  ``max_retries``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from grpc import aio

from conveyor.transport import AddressBook, Backoff, ConnectionOptions
from conveyor.transport._errors import (
    DeadlineExceededError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    QuotaExceededError,
    RPCError,
    StoreUnavailableError,
    UnavailableError,
    error_from_rpc,
    parse_status,
)
from conveyor.transport._routing import SPREAD
from conveyor.v1 import (
    admin_service_pb2_grpc,
    effects_service_pb2_grpc,
    task_service_pb2_grpc,
    task_type_service_pb2_grpc,
    webhook_service_pb2_grpc,
)

if TYPE_CHECKING:
    from conveyor.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from conveyor.v1.effects_service_pb2_grpc import LedgerServiceAsyncStub, LockServiceAsyncStub
    from conveyor.v1.task_service_pb2_grpc import TaskServiceAsyncStub
    from conveyor.v1.task_type_service_pb2_grpc import TaskTypeServiceAsyncStub
    from conveyor.v1.webhook_service_pb2_grpc import WebhookServiceAsyncStub

__all__ = ["Action", "Connection", "RetryRules", "Stubs", "decide", "method_name"]

T = TypeVar("T")

# Between redirects and between passes over the addresses: short, since a leader change
# takes etcd a lease TTL at most and a restarted coordinator is back in under a second.
_FAILOVER_BACKOFF = Backoff(initial=0.05, maximum=1.0)
# Between resends to a coordinator that answered "not now" without saying for how long.
_ANSWERED_BACKOFF = Backoff(initial=0.1, maximum=5.0)
# How long one address may take to connect before the next is tried, when there is a
# next one. A lone address gets the whole deadline instead.
_CONNECT_TIMEOUT = 3.0
# gRPC keeps a channel that failed to connect in TRANSIENT_FAILURE until it is READY
# again ("sticky" failure), so a patient pass cannot wait for a state change that ends
# the attempt; it waits long enough for one reconnect attempt (the reconnect backoff is
# capped at 1 s by ConnectionOptions) and then moves on.
_PATIENT_WAIT = 1.5
# Asked of a channel that failed to connect, only to learn why (see _connect_failure):
# the call fails before anything is sent, and were the channel up, health answers anyone.
_PROBE = "/grpc.health.v1.Health/Check"
_PROBE_TIMEOUT = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Stubs:
    """The services of one coordinator, on its channel."""

    tasks: TaskServiceAsyncStub
    admin: AdminServiceAsyncStub
    ledger: LedgerServiceAsyncStub
    locks: LockServiceAsyncStub
    webhooks: WebhookServiceAsyncStub
    task_types: TaskTypeServiceAsyncStub


StubMethod = Callable[[Stubs], Any]
"""Picks the method to call: ``lambda s: s.tasks.GetTask``."""


class _Named:
    """Stands in for a service stub: each attribute is the full name of that method."""

    __slots__ = ("_prefix",)

    def __init__(self, service: str) -> None:
        self._prefix = f"/conveyor.v1.{service}/"

    def __getattr__(self, name: str) -> str:
        return self._prefix + name


# Stubs whose methods are names: a StubMethod given these says which RPC it calls.
_NAMES = Stubs(
    *cast(
        "tuple[Any, ...]",
        (
            _Named("TaskService"),
            _Named("AdminService"),
            _Named("LedgerService"),
            _Named("LockService"),
            _Named("WebhookService"),
            _Named("TaskTypeService"),
        ),
    )
)


def method_name(method: StubMethod) -> str | None:
    """The full name of the RPC ``method`` picks (``/conveyor.v1.TaskService/GetTask``);
    None when it is not a plain pick of a stub's attribute."""
    try:
        name = method(_NAMES)
    except Exception:
        return None
    return name if isinstance(name, str) else None


AdminMethod = Callable[["AdminServiceAsyncStub"], Any]
"""Picks an AdminService method: ``lambda stub: stub.GetClusterStatus``."""


@dataclasses.dataclass(frozen=True, slots=True)
class RetryRules:
    """What the client resends by itself (the module docstring has the rules)."""

    #: Resend after RESOURCE_EXHAUSTED (OVERLOADED, QUOTA_EXCEEDED) per RetryInfo: every
    #: call (True), none (False), or submits only when the refusal has a RetryInfo (None).
    retry_resource_exhausted: bool | None = None
    #: NOT_LEADER redirects one call follows.
    max_redirects: int = 4
    #: Passes over all addresses for idempotent calls hit by connection failures.
    max_rounds: int = 3
    #: Resends after answers that say "not now", when no deadline bounds them.
    max_retries: int = 10


class Action(enum.Enum):
    """What to do after a failed attempt of a call."""

    #: Resend where a NOT_LEADER error points (or the next address).
    REDIRECT = "redirect"
    #: The connection failed: resend to the next address.
    NEXT_ADDRESS = "next address"
    #: The coordinator answered "not now": resend to it after its RetryInfo.
    SAME_ADDRESS = "same address"
    #: Raise the error.
    RAISE = "raise"


def decide(error: RPCError, *, idempotent: bool, rules: RetryRules, submit: bool = False) -> Action:
    """The retry rule for one failed attempt (``submit``: of a submit call); pure, so the
    rules are tested alone."""
    if isinstance(error, NotLeaderError):
        return Action.REDIRECT
    if isinstance(error, StoreUnavailableError):
        return Action.SAME_ADDRESS  # nothing was written
    if isinstance(error, OutcomeUnknownError):
        return Action.SAME_ADDRESS if idempotent else Action.RAISE
    if is_connection_failure(error):
        return Action.NEXT_ADDRESS if idempotent else Action.RAISE
    if isinstance(error, OverloadedError | QuotaExceededError):
        if rules.retry_resource_exhausted is None:
            # Backpressure by default: a submit waits as long as the server asks, when
            # waiting helps (no RetryInfo: a payload too large, a batch over the burst).
            waits = submit and error.retry_after is not None
            return Action.SAME_ADDRESS if waits else Action.RAISE
        return Action.SAME_ADDRESS if rules.retry_resource_exhausted else Action.RAISE
    return Action.RAISE


def is_connection_failure(error: RPCError) -> bool:
    """A plain UNAVAILABLE (no ErrorInfo) comes from gRPC itself: the connection broke."""
    return type(error) is UnavailableError and error.reason is None


_NOT_RESENT = (
    "It was not resent because it may have reached the server; submits are resent safely "
    "only with a request id (the client gives each one unless retry_submits=False) or an "
    "idempotency key."
)


class Connection:
    """The channels to every known coordinator, and the failover loop over them."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float | None,
        options: ConnectionOptions,
        rules: RetryRules,
    ) -> None:
        self.book = AddressBook(addresses)
        self.timeout = timeout
        self.options = options
        self.rules = rules
        self._metadata = options.call_metadata()
        # Channels are created lazily, inside the running event loop that will use them.
        # Redirect targets outside the addresses get channels too; there are few of them.
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, Stubs] = {}
        self._closed = False
        # Spreading: this client's calls in flight per address, and whose turn it is.
        self._in_flight: dict[str, int] = {}
        self._turn = 0
        #: Calls each address answered (spread or not), for benchmarks and tests.
        self.answers: dict[str, int] = {}

    @property
    def addresses(self) -> list[str]:
        """The configured addresses, in failover order."""
        return self.book.addresses

    def stubs(self, address: str) -> Stubs:
        """The service stubs for one address, opening its channel on first use."""
        stubs = self._stubs.get(address)
        if stubs is None:
            # The generated stubs' overloads type them as async stubs for an aio channel.
            channel = self._channel(address)
            stubs = Stubs(
                task_service_pb2_grpc.TaskServiceStub(channel),
                admin_service_pb2_grpc.AdminServiceStub(channel),
                effects_service_pb2_grpc.LedgerServiceStub(channel),
                effects_service_pb2_grpc.LockServiceStub(channel),
                webhook_service_pb2_grpc.WebhookServiceStub(channel),
                task_type_service_pb2_grpc.TaskTypeServiceStub(channel),
            )
            self._stubs[address] = stubs
        return stubs

    def _channel(self, address: str) -> aio.Channel:
        if self._closed:
            raise RuntimeError("the Conveyor client is closed; create a new one")
        channel = self._channels.get(address)
        if channel is None:
            channel = self.options.open_channel(address)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Closes every channel; in-flight calls are cancelled."""
        self._closed = True
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()

    def deadline(self) -> float | None:
        """The loop time by which a call started now must finish."""
        if self.timeout is None:
            return None
        return asyncio.get_running_loop().time() + self.timeout

    async def unary(
        self, method: StubMethod, request: Any, *, idempotent: bool, submit: bool = False
    ) -> Any:
        """Makes one unary call with failover; raises RPCError subclasses. ``submit``
        marks a submit (see the rules for RESOURCE_EXHAUSTED)."""

        async def attempt(stubs: Stubs, remaining: float | None) -> Any:
            return await method(stubs)(request, timeout=remaining, metadata=self._metadata)

        result, _ = await self.call(
            attempt,
            idempotent=idempotent,
            deadline=self.deadline(),
            submit=submit,
            spread=self._spreads(method),
        )
        return result

    async def admin_unary(self, method: AdminMethod, request: Any, *, idempotent: bool) -> Any:
        """:meth:`unary` for an AdminService method (the same channels, key and rules)."""
        return await self.unary(lambda s: method(s.admin), request, idempotent=idempotent)

    async def stream(self, method: StubMethod, request: Any) -> AsyncGenerator[Any, None]:
        """Opens a server stream with failover, then yields its messages.

        Failover covers opening the stream and reading its first message, bounded by the
        client's timeout; after that the stream runs without deadline and a broken stream
        raises (the caller decides whether to reopen it).
        """

        async def attempt(stubs: Stubs, remaining: float | None) -> Any:
            call = method(stubs)(request, metadata=self._metadata)
            try:
                first = await asyncio.wait_for(call.read(), remaining)
            except BaseException:
                call.cancel()
                raise
            return call, first

        (call, first), address = await self.call(
            attempt,
            idempotent=True,
            deadline=self.deadline(),
            spread=self._spreads(method),
        )
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
        attempt: Callable[[Stubs, float | None], Awaitable[T]],
        *,
        idempotent: bool,
        deadline: float | None,
        submit: bool = False,
        spread: bool = False,
    ) -> tuple[T, str]:
        """Runs ``attempt`` against the coordinators until it succeeds or may not retry.

        ``attempt`` gets the stubs of the address tried. Returns the result and the address
        that produced it. ``spread``: any coordinator answers it alike (the module
        docstring's rule).
        """
        loop = asyncio.get_running_loop()
        spread = spread and len(self.addresses) > 1
        address = self._pick() if spread else self.book.current
        redirects = 0
        retries = 0  # answered "not now" (store, unknown outcome, exhausted)
        failures = 0  # connection failures within this call, over all addresses
        last_error: RPCError | None = None
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise _deadline_error(last_error, address)
            patient = failures >= len(self.addresses)
            if not await self._ready(address, remaining, patient=patient):
                # Never connected, so nothing was sent: safe to move on for any call.
                failures += 1
                last_error = await self._connect_failure(address)
                address = await self._after_failure(address, failures, last_error, deadline)
                continue
            try:
                result = await self._attempt(address, attempt, remaining)
            except TimeoutError:
                # Raised by asyncio.wait_for around a stream's first read.
                raise _deadline_error(last_error, address) from None
            except grpc.RpcError as err:
                error = error_from_rpc(err, address=address)
                action = decide(error, idempotent=idempotent, rules=self.rules, submit=submit)
                if action is Action.REDIRECT and redirects < self.rules.max_redirects:
                    assert isinstance(error, NotLeaderError)
                    redirects += 1
                    # Only the leader answers it after all (an older coordinator, or a
                    # request for what only the leader knows): where it lands is news.
                    spread = False
                    address = self.book.redirect(error.leader_address, from_address=address)
                    delay = error.retry_after
                    if delay is None:
                        delay = _FAILOVER_BACKOFF.delay(redirects)
                    await asyncio.sleep(_clamp(delay, deadline))
                    continue
                if action is Action.SAME_ADDRESS:
                    retries += 1
                    delay = error.retry_after
                    if delay is None:
                        delay = _ANSWERED_BACKOFF.delay(retries)
                    if _out_of_budget(retries, delay, deadline, self.rules, loop.time()):
                        error._append(
                            f"(Resent {retries - 1} time(s); the client's timeout or retry "
                            f"budget leaves no room for the next wait of {delay:g}s.)"
                        )
                        raise error from err
                    last_error = error
                    await asyncio.sleep(delay)
                    continue
                if action is Action.NEXT_ADDRESS:
                    failures += 1
                    last_error = error
                    address = await self._after_failure(address, failures, error, deadline)
                    continue
                if not idempotent and (
                    is_connection_failure(error) or isinstance(error, OutcomeUnknownError)
                ):
                    error._append(_NOT_RESENT)
                raise error from err
            if not spread:
                self.book.answered(address)
            self.answers[address] = self.answers.get(address, 0) + 1
            return result, address

    def _spreads(self, method: StubMethod) -> bool:
        """Whether a call of ``method`` is spread (never with one address: no cost then)."""
        return len(self.addresses) > 1 and method_name(method) in SPREAD

    async def _attempt(
        self,
        address: str,
        attempt: Callable[[Stubs, float | None], Awaitable[T]],
        remaining: float | None,
    ) -> T:
        """One attempt at ``address``, counted in flight there while it runs."""
        self._in_flight[address] = self._in_flight.get(address, 0) + 1
        try:
            return await attempt(self.stubs(address), remaining)
        finally:
            self._in_flight[address] -= 1

    def _pick(self) -> str:
        """Where a spread call starts: of the connected coordinators, the one with the
        fewest of this client's calls in flight, taking turns among equals (sequential
        calls go round the list). Asking every channel's state also starts connecting
        those not connected yet or any more, so a restarted coordinator rejoins. None
        connected (at the start, or all down): the usual address, and the failover
        loop's connect and wait."""
        addresses = self.addresses
        count = len(addresses)
        start = self._turn
        self._turn = (start + 1) % count
        best: str | None = None
        least = 0
        for i in range(count):
            address = addresses[(start + i) % count]
            state = self._channel(address).get_state(try_to_connect=True)
            if state is not grpc.ChannelConnectivity.READY:
                continue
            load = self._in_flight.get(address, 0)
            if best is None or load < least:
                best, least = address, load
        return self.book.current if best is None else best

    async def _after_failure(
        self, address: str, failures: int, error: RPCError, deadline: float | None
    ) -> str:
        """Picks the next address after a connection failure, or raises when out of passes."""
        if failures >= len(self.addresses) * self.rules.max_rounds:
            raise error
        if failures % len(self.addresses) == 0:
            # A full pass failed: pause before the next one instead of spinning.
            delay = _FAILOVER_BACKOFF.delay(failures // len(self.addresses))
            await asyncio.sleep(_clamp(delay, deadline))
        return self.book.next_after(address)

    async def _connect_failure(self, address: str) -> UnavailableError:
        """Why ``address`` could not be connected to, in gRPC's words where it has them: a
        call on a channel in TRANSIENT_FAILURE fails at once, unsent, saying why (a refused
        TLS handshake, a refused connection); they go in ``server_message``."""
        detail = ""
        channel = self._channel(address)
        if channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            try:
                probe = channel.unary_unary(
                    _PROBE, request_serializer=bytes, response_deserializer=bytes
                )
                await probe(b"", timeout=_PROBE_TIMEOUT)
            except grpc.RpcError as err:
                detail = parse_status(err).message
        return _connect_error(address, tls=self.options.credentials is not None, detail=detail)

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


def _out_of_budget(
    retries: int, delay: float, deadline: float | None, rules: RetryRules, now: float
) -> bool:
    if deadline is None:
        return retries > rules.max_retries
    # Waiting only to hit the deadline would hide the server's answer behind a timeout.
    return now + delay >= deadline


def _connect_error(address: str, *, tls: bool = False, detail: str = "") -> UnavailableError:
    # The channel reports only that it failed, not why: over TLS a refused handshake
    # (untrusted certificate, a plaintext coordinator, a missing client certificate)
    # looks the same as an absent coordinator, so name those causes too.
    why = (
        " Over TLS, also check that the coordinator serves TLS, that its certificate is "
        "issued by a CA the client trusts (--tls-ca) for the name dialled, and, if it "
        "requires client certificates, that this client presents one it accepts "
        "(--tls-cert, --tls-key)."
        if tls
        else ""
    )
    return UnavailableError(
        f"cannot connect to the coordinator at {address}. Check that it is running and "
        f"reachable from here, or pass the addresses of more coordinators.{why}",
        code=grpc.StatusCode.UNAVAILABLE,
        address=address,
        server_message=detail,
    )


def _deadline_error(last_error: RPCError | None, address: str) -> RPCError:
    if last_error is not None:
        # The deadline ran out while failing over; the failure that caused the failover
        # says more than "deadline exceeded" does.
        last_error._append("(The client's timeout ran out while trying again.)")
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
