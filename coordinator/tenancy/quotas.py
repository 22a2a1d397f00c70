"""Quotas and admission control per tenant: backlog, submit rate, payload size, schedules.

Each tenant's limits are the ones set for it (``conveyor tenants set``, the admin API's
UpdateTenantLimits; cached by ``directory.py``) over the coordinator's defaults
(``CoordinatorConfig``: ``max_backlog``, ``submit_rate``, ``submit_burst``,
``max_payload_bytes``, ``max_schedules``); 0 is no limit. A submit over any of them is
refused before anything is written: RESOURCE_EXHAUSTED, reason QUOTA_EXCEEDED, a
``google.rpc.QuotaFailure`` whose subject names the limit, and ``RetryInfo`` when waiting
helps (the backlog and the rate; not a payload too large, nor a schedule too many).

Admission is per call: one SubmitTasks of 500 tasks costs one check and takes 500
tokens, never 500 checks. The submit rate is a token bucket per tenant
(:class:`TokenBucket`), in each coordinator's memory: every coordinator serves submits
(followers too), so a tenant whose clients spread their submits over several replicas
may reach the rate on each; a client sticks to the coordinator that answered it last, so
in the common case one coordinator admits a client's submits. A coordinator starts every
bucket full.

A schedule's firing is a submit too: the firer asks once per tenant and batch
(:meth:`Quotas.admit_firings`), which admits as many firings as the tenant's backlog and
bucket have room for; the ticks refused are recorded on their schedules
(``schedule_firer.py``). The payload limit and the schedule count were checked when the
schedule was written.

Every value here is within its range (``bounds.py``): the limits when they are set, and
a RetryInfo is at most ``bounds.RETRY_AFTER_MAX``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import asyncpg

from conveyor.coordinator import bounds
from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.config import DEFAULT_QUEUE, CoordinatorConfig
from conveyor.coordinator.errors import QuotaExceeded, StoreUnavailable
from conveyor.coordinator.store import tenants as store
from conveyor.coordinator.tenancy.backlog import BacklogCounter
from conveyor.coordinator.tenancy.directory import Directory
from conveyor.coordinator.tenancy.queue_backlog import QueueBacklogCounter

HOLD_MAX = 1.0
"""Longest a refusal is held back (see :meth:`Quotas.hold`)."""
DEADLINE_MARGIN = 0.05


async def hold_back(seconds: float) -> None:
    """Waits ``seconds`` (at most HOLD_MAX), ending before the call's deadline."""
    delay = min(seconds, HOLD_MAX)
    deadline = request_context.current().deadline
    if deadline is not None:
        delay = min(delay, deadline - asyncio.get_running_loop().time() - DEADLINE_MARGIN)
    if delay > 0:
        await asyncio.sleep(delay)


class _Submit(Protocol):
    """One task of a submit call: a request (not yet validated) or a validated task."""

    @property
    def payload(self) -> bytes: ...

    @property
    def queue(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits in force (0: no limit)."""

    max_backlog: int = 0
    submit_rate: float = 0.0
    """Tasks per second, on average."""
    submit_burst: int = 0
    """Bucket size; 0 with a rate: one second's worth, at least 1."""
    max_payload_bytes: int = 0
    max_schedules: int = 0
    dispatch_weight: int = 1
    """The tenant's share of dispatch (``DispatchPolicy.plan``): not a limit, 1 to
    ``bounds.MAX_DISPATCH_WEIGHT``; no coordinator default (always 1)."""

    @property
    def bucket_size(self) -> int:
        return self.submit_burst or max(1, math.ceil(self.submit_rate))

    @staticmethod
    def defaults(config: CoordinatorConfig) -> Limits:
        return Limits(
            max_backlog=config.max_backlog,
            submit_rate=config.submit_rate,
            submit_burst=config.submit_burst,
            max_payload_bytes=config.max_payload_bytes,
            max_schedules=config.max_schedules,
        )

    def over(self, overrides: dict[str, Any] | None) -> Limits:
        """These limits with a tenant's own (None fields: keep these)."""
        if not overrides:
            return self
        changes = {
            f.name: overrides[f.name] for f in fields(self) if overrides.get(f.name) is not None
        }
        return replace(self, **changes) if changes else self


class TokenBucket:
    """``rate`` tokens a second, at most ``size`` held; starts full."""

    __slots__ = ("_last", "rate", "size", "tokens")

    def __init__(self, rate: float, size: int) -> None:
        self.rate = rate
        self.size = size
        self.tokens = float(size)
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.size, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, count: int) -> float | None:
        """Takes ``count`` tokens and returns None, or takes none and returns the seconds
        until ``count`` are there (``math.inf`` when count is more than the bucket holds)."""
        self._refill()
        if count <= self.tokens:
            self.tokens -= count
            return None
        if count > self.size:
            return math.inf
        return (count - self.tokens) / self.rate

    def take_up_to(self, count: int) -> int:
        """Takes as many whole tokens as there are, up to ``count``; returns how many."""
        self._refill()
        taken = min(count, int(self.tokens))
        self.tokens -= taken
        return taken


class Quotas:
    """Admission control for submits and schedules; see the module docstring."""

    def __init__(
        self,
        config: CoordinatorConfig,
        directory: Directory,
        backlog: BacklogCounter,
        queue_backlog: QueueBacklogCounter | None = None,
    ) -> None:
        self._config = config
        self._directory = directory
        self.backlog = backlog
        self.queue_backlog = queue_backlog if config.max_queue_backlog > 0 else None
        """The per-queue backlog limit's counter, while the limit is set."""
        backlog.limited = self.backlog_limited
        self.defaults = Limits.defaults(config)
        self._limits: dict[str, Limits] = {}
        self._buckets: dict[str, TokenBucket] = {}
        # Per tenant: until when (time.monotonic()) its last refusal told it to wait.
        self._refused_until: dict[str, float] = {}
        directory.on_tenant_change(self._forget)

    def _forget(self, tenant: str) -> None:
        self._limits.pop(tenant, None)
        self._buckets.pop(tenant, None)  # a new rate starts a full bucket
        if not self.backlog.current:
            self.backlog.wake()  # a first backlog limit: count now, not at the next refresh

    def limits(self, tenant: str) -> Limits:
        """The limits in force for ``tenant``."""
        found = self._limits.get(tenant)
        if found is None:
            found = self.defaults.over(self._directory.limits.get(tenant))
            self._limits[tenant] = found
        return found

    def backlog_limited(self) -> bool:
        """Whether any tenant has a backlog limit (else nothing needs counting)."""
        return self.defaults.max_backlog > 0 or any(
            row.get("max_backlog") for row in self._directory.limits.values()
        )

    def limits_firings(self) -> bool:
        """Whether any tenant has a backlog or rate limit (else firings need no asking)."""
        return (
            self.defaults.max_backlog > 0
            or self.defaults.submit_rate > 0
            or any(
                row.get("max_backlog") or row.get("submit_rate")
                for row in self._directory.limits.values()
            )
        )

    async def backlog_ready(self) -> None:
        """Returns once the backlog count can be trusted, if any tenant has a backlog
        limit: after this coordinator took office, or a first limit was set, the count is
        empty until the counter has counted (see ``backlog.py``)."""
        if not self.backlog.current and self.backlog_limited():
            timeout = self._config.statement_timeout
            try:
                async with asyncio.timeout(timeout):
                    await self.backlog.ready()
            except TimeoutError:
                raise StoreUnavailable(
                    f"the tenants' backlog count did not finish within {timeout:g}s"
                ) from None

    # -- submits ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admission(self, tenant: str, requests: Sequence[_Submit]) -> AsyncIterator[None]:
        """Admits one submit call, before its requests are even validated, or raises
        QuotaExceeded (held back first when the tenant ignores RetryInfo: see
        :meth:`hold`); the call's tasks count in the tenant's backlog until it ends."""
        if not self.backlog.current and self.limits(tenant).max_backlog > 0:
            await self.backlog_ready()
        per_queue = await self._per_queue(requests) if self.queue_backlog else None
        try:
            self.admit(tenant, requests, per_queue)
        except QuotaExceeded as exc:
            await self.hold(tenant, exc)
            raise
        try:
            yield
        finally:
            self.done(tenant, len(requests))
            if per_queue and self.queue_backlog is not None:
                self.queue_backlog.done(tenant, per_queue)

    async def _per_queue(self, requests: Sequence[_Submit]) -> dict[str, int] | None:
        """A call's tasks per queue, when the per-queue backlog limit is set (once its
        count can be trusted); else None."""
        counter = self.queue_backlog
        if counter is None:
            return None
        if not counter.current:
            timeout = self._config.statement_timeout
            try:
                async with asyncio.timeout(timeout):
                    await counter.ready()
            except TimeoutError:
                raise StoreUnavailable(
                    f"the queues' backlog count did not finish within {timeout:g}s"
                ) from None
        per_queue: dict[str, int] = {}
        for request in requests:
            queue = request.queue or DEFAULT_QUEUE
            per_queue[queue] = per_queue.get(queue, 0) + 1
        return per_queue

    async def hold(self, tenant: str, refusal: QuotaExceeded) -> None:
        """Answers a refusal late when the tenant was told to wait and did not.

        Every call costs the coordinator about a third of a millisecond of CPU in gRPC
        alone, refused or not, so a client that resends in a tight loop past its limits
        would take that CPU from every other tenant. The first refusal is answered at
        once, with RetryInfo; one that comes while an earlier refusal's RetryInfo still
        runs is answered when it runs out (at most HOLD_MAX, and before the call's
        deadline). A client that honours RetryInfo is never held.
        """
        if refusal.retry_after is None:
            return
        now = time.monotonic()
        until = self._refused_until.get(tenant, 0.0)
        self._refused_until[tenant] = max(until, now + bounds.retry_delay(refusal.retry_after))
        if now < until:
            await hold_back(until - now)

    def admit(
        self, tenant: str, tasks: Sequence[_Submit], per_queue: dict[str, int] | None = None
    ) -> None:
        """Admits one submit call, or raises QuotaExceeded (nothing is written); call
        :meth:`done` when the submit has finished (and ``queue_backlog.done`` with
        ``per_queue``, the call's tasks per queue when the per-queue limit is set)."""
        limits = self.limits(tenant)
        count = len(tasks)
        if count and 0 < limits.max_payload_bytes < self._config.max_payload_bytes:
            self.check_payload(tenant, max(len(t.payload) for t in tasks), limits)
        # The backlogs first: a submit they refuse takes no token.
        self.backlog.check(tenant, count, limits.max_backlog)
        queues = self.queue_backlog if per_queue else None
        if queues is not None and per_queue:
            queues.admit(tenant, per_queue)
        try:
            if limits.submit_rate > 0:
                self._take(tenant, count, limits)
        except QuotaExceeded:
            if queues is not None and per_queue:
                queues.withdraw(tenant, per_queue)  # refused: nothing will be written
            raise
        self.backlog.admit(tenant, count)

    def admit_firings(self, tenant: str, count: int) -> tuple[int, str | None]:
        """Admits up to ``count`` schedule firings of ``tenant``, as many as its backlog and
        submit rate have room for; returns how many, and the limit that refused the others
        (None when none was refused). Call :meth:`done` with the count admitted once their
        transaction has ended."""
        limits = self.limits(tenant)
        admitted, refused_by = count, None
        if limits.max_backlog > 0:
            room = max(0, limits.max_backlog - self.backlog.estimate(tenant))
            if room < admitted:
                admitted, refused_by = room, "max_backlog"
        if limits.submit_rate > 0 and admitted:
            taken = self._bucket(tenant, limits).take_up_to(admitted)
            if taken < admitted:
                admitted, refused_by = taken, "submit_rate"
        if admitted:
            self.backlog.admit(tenant, admitted)
        return admitted, refused_by

    def done(self, tenant: str, count: int) -> None:
        self.backlog.done(tenant, count)

    def _bucket(self, tenant: str, limits: Limits) -> TokenBucket:
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != limits.submit_rate:
            bucket = self._buckets[tenant] = TokenBucket(limits.submit_rate, limits.bucket_size)
        return bucket

    def _take(self, tenant: str, count: int, limits: Limits) -> None:
        bucket = self._bucket(tenant, limits)
        wait = bucket.take(count)
        if wait is None:
            return
        rate = f"{limits.submit_rate:g} tasks/s, burst {bucket.size}"
        if math.isinf(wait):
            raise QuotaExceeded(
                "submit_rate",
                f"a batch of {count} tasks is more than tenant {tenant!r} may submit at once "
                f"({rate}); send smaller batches",
                retry_after=None,
            )
        raise QuotaExceeded(
            "submit_rate",
            f"tenant {tenant!r} is submitting faster than its limit ({rate})",
            retry_after=max(0.001, wait),
        )

    def check_payload(self, tenant: str, size: int, limits: Limits | None = None) -> None:
        """Raises QuotaExceeded when a payload of ``size`` bytes is over the tenant's limit."""
        limit = (limits or self.limits(tenant)).max_payload_bytes
        if 0 < limit < size:
            raise QuotaExceeded(
                "max_payload_bytes",
                f"a payload of {size} bytes is larger than tenant {tenant!r} may submit "
                f"({limit} bytes, max_payload_bytes); send a reference to the data instead",
                retry_after=None,
            )

    # -- schedules -------------------------------------------------------------------------

    async def admit_schedule(self, conn: asyncpg.Connection, tenant: str) -> None:
        """In the transaction that creates a schedule: raises QuotaExceeded when the tenant
        has as many as it may (holding the tenant's lock, so two creations cannot both
        take the last place)."""
        limit = self.limits(tenant).max_schedules
        if limit <= 0:
            return
        count = await store.lock_and_count_schedules(conn, tenant)
        if count >= limit:
            raise QuotaExceeded(
                "max_schedules",
                f"tenant {tenant!r} has {count} schedules, its limit (max_schedules); delete "
                "one first",
                retry_after=None,
            )
