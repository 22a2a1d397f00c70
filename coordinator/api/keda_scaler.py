"""KEDA's external scaler API, served by every coordinator: queue depth as a scaling signal.

KEDA (``type: external`` triggers of a ScaledObject, ``deploy/kubernetes/scaledobject.yaml``)
calls ``/externalscaler.ExternalScaler/*`` with the trigger's metadata in
``ScaledObjectRef.scalerMetadata``; the proto is KEDA's own, vendored unchanged
(``proto/conveyor/keda``). What the metadata says:

- ``queue``: the queue, or several separated by commas (summed); default ``default``.
- ``type``: optional; only tasks of this type, or of several separated by commas (the
  types the scaled workers serve: a task no worker of theirs can take is no reason to
  start one); default every type.
- ``metric``: ``backlog`` (default): tasks PENDING in those queues, plus those RUNNING
  unless ``includeRunning`` is ``false`` (so busy workers are not scaled away under their
  tasks); or ``oldestPendingAge``: seconds the oldest PENDING task has waited.
- ``target``: the value one replica should carry (GetMetricSpec's target): tasks per
  worker (default 10) or seconds (default 30). Use ``metricType: AverageValue`` (KEDA's
  default) for the backlog and ``metricType: Value`` for the age.
- ``activationTarget``: the workload is active (IsActive, scaled up from zero) while the
  value is above this (default 0).
- ``streamInterval``: seconds between looks of StreamIsActive (default 5, at least 0.5).
- ``tenant``: optional; must be the key's tenant (with authentication off it picks the
  tenant, default ``default``).

Authentication. KEDA sends no gRPC metadata of its own; what it sends is the trigger
metadata, and it resolves ``<name>FromEnv`` entries from the scaled workload's
environment. So the API key travels as ``apiKeyFromEnv: CONVEYOR_API_KEY``: KEDA reads
that variable of the worker Deployment (from its Secret) and sends its value under
``apiKeyFromEnv``. (An ``authorization: Bearer`` header, from grpcurl say, is read first.)
The key needs the ``read`` or the ``worker`` scope: a worker's own key may see its queues'
depth. KEDA's TriggerAuthentication carries only TLS material for this trigger
(``caCert``, ``tlsClientCert``, ``tlsClientKey``): serve the coordinator with TLS so the
key is not sent in the clear. Failures are the API's usual statuses (UNAUTHENTICATED,
PERMISSION_DENIED, INVALID_ARGUMENT for bad metadata), audited and throttled by the same
:class:`~conveyor.coordinator.tenancy.auth.Authenticator`.

These are reads: any coordinator answers (no leader needed), two counts on the partial
indexes (``store.tasks.queue_backlog``). They are exact, so linear in the depth of the
queues named: next to nothing while they are shallow, but by their shape about a second of
PostgreSQL with 10,000,000 tasks waiting (the metrics' depth count took 1.1 s there;
docs/performance.md, issue 19, seventh round). Many callers ask the same question (KEDA's
IsActive and GetMetrics, and every ``conveyor worker --autoscale`` supervisor every 5 s),
so :class:`SharedBacklog` reuses a slow read (50 ms or more) for 20 times as long as it
took: fresh while the queues are shallow, about 5 % of PostgreSQL's time however deep they
get.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from conveyor.coordinator.api.validation import name_problem
from conveyor.coordinator.config import DEFAULT_QUEUE, DEFAULT_TENANT
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
    domain_error,
    internal_status,
    to_status,
)
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.coordinator.tenancy.auth import AUTHORIZATION, Authenticator, peer_host
from conveyor.keda import externalscaler_pb2 as pb
from conveyor.keda import externalscaler_pb2_grpc as pb_grpc

_log = logging.getLogger("conveyor.coordinator.keda")

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name
BACKLOG = "backlog"
OLDEST_PENDING_AGE = "oldestPendingAge"
METRIC_NAMES = {BACKLOG: "conveyor-backlog", OLDEST_PENDING_AGE: "conveyor-oldest-pending-age"}
DEFAULT_TARGETS = {BACKLOG: 10.0, OLDEST_PENDING_AGE: 30.0}
API_KEY_ENTRY = "apiKeyFromEnv"
SCOPES = frozenset({api_keys.READ, api_keys.WORKER})
MIN_STREAM_INTERVAL = 0.5
DEFAULT_STREAM_INTERVAL = 5.0
MAX_QUEUES = 100
MAX_TYPES = 1000  # as many as a worker's Hello may name
_FIELD = "scaledObjectRef.scalerMetadata"


@dataclass(frozen=True, slots=True)
class Trigger:
    """What one ScaledObject trigger asks for, from its metadata (see the module docstring)."""

    tenant: str
    queues: tuple[str, ...]
    metric: str
    target: float
    activation: float
    include_running: bool
    stream_interval: float
    types: tuple[str, ...] = ()
    """Only tasks of these types; none: every type."""

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]


def _number(meta: Mapping[str, str], name: str, default: float, low: float,
            out: list[FieldViolation]) -> float:  # fmt: skip
    text = meta.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low:
        out.append(FieldViolation(f"{_FIELD}.{name}", f"must be a number >= {low:g}, got {text!r}"))
    return value


def parse_trigger(meta: Mapping[str, str], tenant: str) -> Trigger:
    """The trigger ``meta`` describes, for a caller of ``tenant``; InvalidArgument naming
    each bad entry."""
    out: list[FieldViolation] = []
    problem = name_problem(tenant)
    if problem is not None:
        out.append(FieldViolation(f"{_FIELD}.tenant", f"tenant {tenant!r} {problem}"))
    queues = tuple(q.strip() for q in meta.get("queue", DEFAULT_QUEUE).split(","))
    if len(queues) > MAX_QUEUES:
        out.append(FieldViolation(f"{_FIELD}.queue", f"names at most {MAX_QUEUES} queues"))
    for queue in queues:
        problem = name_problem(queue)
        if problem is not None:
            out.append(FieldViolation(f"{_FIELD}.queue", f"queue {queue!r} {problem}"))
    types = tuple(t.strip() for t in meta.get("type", "").split(",") if t.strip())
    if len(types) > MAX_TYPES:
        out.append(FieldViolation(f"{_FIELD}.type", f"names at most {MAX_TYPES} types"))
    for type_ in types:
        problem = name_problem(type_)
        if problem is not None:
            out.append(FieldViolation(f"{_FIELD}.type", f"type {type_!r} {problem}"))
    metric = meta.get("metric", BACKLOG)
    if metric not in METRIC_NAMES:
        known = " or ".join(METRIC_NAMES)
        out.append(FieldViolation(f"{_FIELD}.metric", f"must be {known}, got {metric!r}"))
        metric = BACKLOG
    target = _number(meta, "target", DEFAULT_TARGETS[metric], 0, out)
    if target == 0:
        out.append(FieldViolation(f"{_FIELD}.target", "must be above 0"))
    activation = _number(meta, "activationTarget", 0.0, 0, out)
    interval = _number(meta, "streamInterval", DEFAULT_STREAM_INTERVAL, MIN_STREAM_INTERVAL, out)
    running = meta.get("includeRunning", "true").lower()
    if running not in ("true", "false"):
        out.append(
            FieldViolation(f"{_FIELD}.includeRunning", f"must be true or false, got {running!r}")
        )
    if out:
        raise InvalidArgument(out)
    return Trigger(tenant, queues, metric, target, activation, running == "true", interval, types)


BacklogKey = tuple[str, tuple[str, ...], tuple[str, ...]]
"""A backlog read's question: the tenant, its queues and the task types (none: all)."""


class SharedBacklog:
    """Backlog reads shared by every caller that asks the same question.

    A read that took ``SLOW`` or longer is reused for ``COST_FACTOR`` times as long as it
    took, so its cost stays near 1/20 of the time however deep the queues get; a faster one
    (shallow queues: a millisecond or two) is not reused at all, so what a caller reads
    right after a submit counts it. A reused answer's counts and oldest task's age are as
    of its read. The most recently asked ``MAX_ENTRIES`` questions are kept.
    """

    SLOW = 0.05
    COST_FACTOR = 20.0
    MAX_ENTRIES = 1024

    def __init__(
        self,
        read: Callable[[str, tuple[str, ...], tuple[str, ...]], Awaitable[store.Backlog]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._clock = clock
        self._entries: OrderedDict[BacklogKey, tuple[store.Backlog, float, float]] = OrderedDict()
        """Each question's last answer, when it was read and for how long it is reused."""

    async def get(
        self, tenant: str, queues: tuple[str, ...], types: tuple[str, ...]
    ) -> store.Backlog:
        key = (tenant, queues, types)
        hit = self._entries.get(key)
        if hit is not None:
            backlog, read_at, reuse_for = hit
            if self._clock() - read_at < reuse_for:
                self._entries.move_to_end(key)
                return backlog
        started = self._clock()
        backlog = await self._read(tenant, queues, types)
        done = self._clock()
        took = done - started
        self._entries[key] = (backlog, done, self.COST_FACTOR * took if took >= self.SLOW else 0.0)
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        return backlog


class KedaScaler(pb_grpc.ExternalScalerServicer):
    """The ``externalscaler.ExternalScaler`` service (see the module docstring)."""

    def __init__(self, deps: Deps, authenticator: Authenticator | None) -> None:
        self._deps = deps
        self._authenticator = authenticator
        """None with authentication off: every call acts as the tenant it names."""
        self._backlog = SharedBacklog(self._read_backlog)

    # -- the four RPCs KEDA calls -----------------------------------------------------------

    async def IsActive(self, request: pb.ScaledObjectRef, context: Context) -> pb.IsActiveResponse:
        async def call() -> pb.IsActiveResponse:
            trigger = self._trigger(request, context, "IsActive")
            return pb.IsActiveResponse(result=await self._value(trigger) > trigger.activation)

        return await self._guarded(context, call)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """Says whether the workload is active at once, then again each time it changes
        (looking every ``streamInterval`` seconds), until KEDA ends the stream. The key is
        checked at each look: a revoked or expired one ends the stream (UNAUTHENTICATED)."""

        async def active_now() -> tuple[bool, float]:
            trigger = self._trigger(request, context, "StreamIsActive")
            return await self._value(trigger) > trigger.activation, trigger.stream_interval

        last: bool | None = None
        while True:
            active, interval = await self._guarded(context, active_now)
            if active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            await asyncio.sleep(interval)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> pb.GetMetricSpecResponse:
        async def call() -> pb.GetMetricSpecResponse:
            trigger = self._trigger(request, context, "GetMetricSpec")
            spec = pb.MetricSpec(
                metricName=trigger.metric_name,
                targetSize=max(1, math.ceil(trigger.target)),
                targetSizeFloat=trigger.target,
            )
            return pb.GetMetricSpecResponse(metricSpecs=[spec])

        return await self._guarded(context, call)

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Context
    ) -> pb.GetMetricsResponse:
        async def call() -> pb.GetMetricsResponse:
            trigger = self._trigger(request.scaledObjectRef, context, "GetMetrics")
            if request.metricName and request.metricName != trigger.metric_name:
                raise InvalidArgument([FieldViolation(
                    "metricName",
                    f"this trigger's metric is {trigger.metric_name!r} (from GetMetricSpec), "
                    f"got {request.metricName!r}",
                )])  # fmt: skip
            value = await self._value(trigger)
            return pb.GetMetricsResponse(
                metricValues=[
                    pb.MetricValue(
                        metricName=trigger.metric_name,
                        metricValue=math.ceil(value),
                        metricValueFloat=value,
                    )
                ]
            )

        return await self._guarded(context, call)

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Not served: a trigger's targets come from its metadata and never change, so
        there is nothing to push; KEDA takes UNIMPLEMENTED as "use GetMetricSpec"."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamMetricSpec is not served: the targets never change; use GetMetricSpec",
        )
        yield pb.GetMetricSpecResponse()  # never reached: makes this a stream handler

    # -- what they share --------------------------------------------------------------------

    async def _value(self, trigger: Trigger) -> float:
        backlog = await self._backlog.get(trigger.tenant, trigger.queues, trigger.types)
        if trigger.metric == OLDEST_PENDING_AGE:
            return backlog.oldest_pending_age_seconds
        return float(backlog.pending + (backlog.running if trigger.include_running else 0))

    async def _read_backlog(
        self, tenant: str, queues: tuple[str, ...], types: tuple[str, ...]
    ) -> store.Backlog:
        async with self._deps.db.read() as conn:
            return await store.queue_backlog(conn, tenant, queues, types)

    def _trigger(self, ref: pb.ScaledObjectRef, context: Context, rpc: str) -> Trigger:
        """Authenticates the call and reads its trigger."""
        meta = dict(ref.scalerMetadata)
        asked = meta.get("tenant", "")
        if self._authenticator is None:
            return parse_trigger(meta, asked or DEFAULT_TENANT)
        metadata = [(k, v) for k, v in context.invocation_metadata() or () if k == AUTHORIZATION]
        if not metadata:
            key = meta.get(API_KEY_ENTRY, "")
            if not key:
                raise Unauthenticated(
                    "missing",
                    f"no API key: set the trigger's metadata {API_KEY_ENTRY} to the name of "
                    "an environment variable of the scaled workload that holds a key with "
                    "the read or worker scope (KEDA sends its value), or send "
                    "'authorization: Bearer <key>'",
                )
            metadata = [(AUTHORIZATION, f"Bearer {key}")]
        method = f"/{SERVICE_NAME}/{rpc}"
        host = peer_host(context.peer())
        identity = self._authenticator.authenticate(metadata, host, method, "")
        if not identity.scopes & SCOPES:
            raise self._authenticator.denied(identity, method, api_keys.READ, host)
        if asked and asked != identity.tenant:
            raise InvalidArgument([FieldViolation(
                f"{_FIELD}.tenant",
                f"names tenant {asked!r}, but the API key is tenant {identity.tenant!r}'s: "
                "drop the entry or use a key of that tenant",
            )])  # fmt: skip
        return parse_trigger(meta, identity.tenant)

    @staticmethod
    async def _guarded(context: Context, call: Callable[[], Awaitable[T]]) -> T:
        """Runs ``call`` and aborts with the API's status for what it raises: these methods
        are not ``conveyor.v1``'s, so the error interceptor does not see them."""
        try:
            return await call()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            error = domain_error(exc)
            if error is None:
                _log.exception("the KEDA scaler failed: a bug")
                await context.abort_with_status(internal_status("keda"))
                raise
            await context.abort_with_status(to_status(error))
            raise


__all__ = ["SERVICE_NAME", "KedaScaler", "Trigger", "parse_trigger"]
