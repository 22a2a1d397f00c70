"""OpenTelemetry tracing for Conveyor's processes: one trace from submit to execution.

A task carries its submitter's W3C ``traceparent`` (stored with the task). The spans:

- ``submit {type}`` (client, kind PRODUCER): :meth:`Tracing.submit_span` around a submit;
  its context is the ``traceparent`` the request carries.
- ``dispatch {type}`` (coordinator, kind PRODUCER): :meth:`Tracing.dispatch_spans`, one
  per leased attempt, a child of the stored ``traceparent``; it returns the dispatch
  span's own ``traceparent`` for the assignment, so the execution nests under it.
- ``execute {type}`` (worker, kind CONSUMER): :meth:`Tracing.execution_span`, a child of
  the assignment's ``traceparent``, current while the handler runs (a handler's own spans
  nest under it). Retries are further dispatch and execute spans in the same trace.

Each span has the attributes in :data:`ATTRIBUTES` (task id, queue, type, attempt,
tenant). gRPC calls get spans too, through :meth:`Tracing.server_interceptors` and
:meth:`Tracing.client_interceptors` (opentelemetry-instrumentation-grpc).

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``, or an
explicit endpoint) is set: spans go to that OTLP/gRPC endpoint through a batch span
processor. Otherwise :meth:`Tracing.from_env` returns a disabled :class:`Tracing`: the
OpenTelemetry SDK is not even imported, and each helper is a branch on one attribute.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    import grpc

__all__ = [
    "ATTRIBUTES",
    "ATTR_ATTEMPT",
    "ATTR_OUTCOME",
    "ATTR_QUEUE",
    "ATTR_TASK_ID",
    "ATTR_TENANT",
    "ATTR_TYPE",
    "SERVICE_CLIENT",
    "SERVICE_COORDINATOR",
    "SERVICE_WORKER",
    "UNTRACED_RPC_PREFIXES",
    "Row",
    "Tracing",
    "current_traceparent",
    "endpoint_from_env",
]

ATTR_TASK_ID = "conveyor.task.id"
ATTR_QUEUE = "conveyor.queue"
ATTR_TYPE = "conveyor.task.type"
ATTR_ATTEMPT = "conveyor.task.attempt"
ATTR_TENANT = "conveyor.tenant"
ATTR_OUTCOME = "conveyor.task.outcome"
#: The attributes every task span carries.
ATTRIBUTES = (ATTR_TASK_ID, ATTR_QUEUE, ATTR_TYPE, ATTR_ATTEMPT, ATTR_TENANT)

SERVICE_COORDINATOR = "conveyor-coordinator"
SERVICE_WORKER = "conveyor-worker"
SERVICE_CLIENT = "conveyor-client"

#: RPCs the server interceptor leaves alone: the long-lived streams (a span over a worker's
#: hours-long session says nothing, and opentelemetry-instrumentation-grpc's aio server
#: interceptor only wraps async-generator streams, while these write with
#: ``context.write``: it fails them with a TypeError), health probes (noise every few
#: seconds) and reflection.
UNTRACED_RPC_PREFIXES = (
    "/conveyor.v1.WorkerService/Connect",
    "/conveyor.v1.TaskService/WatchTask",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
)

_INSTRUMENTATION = "conveyor"
_propagator = TraceContextTextMapPropagator()
_log = logging.getLogger("conveyor.observability.tracing")


class Row(Protocol):
    """A claimed task's row: anything indexable by column name (asyncpg.Record, dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


def endpoint_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint the standard variables name, or None when tracing is off.

    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off even with an
    endpoint set.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return endpoint.strip() if endpoint and endpoint.strip() else None


def _task_attributes(
    task_id: str, queue: str, type_: str, attempt: int, tenant: str
) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        ATTR_TASK_ID: task_id,
        ATTR_QUEUE: queue,
        ATTR_TYPE: type_,
        ATTR_ATTEMPT: attempt,
        "messaging.system": "conveyor",
        "messaging.destination.name": queue,
        "messaging.message.id": task_id,
    }
    if tenant:  # a worker does not know its tenant (the coordinator's spans carry it)
        attributes[ATTR_TENANT] = tenant
    return attributes


def _parent(traceparent: str) -> Any:
    """The context a stored ``traceparent`` names (an empty one when it is blank or bad:
    the span then starts a trace of its own)."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def _traceparent_of(span: trace.Span) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


class Tracing:
    """The tracing of one process, or of a client library user's process.

    Make it with :meth:`from_env` (Conveyor's own processes), :meth:`disabled`, or
    :meth:`from_provider` (an application's provider, e.g. the global one for the client
    library). ``enabled`` is False only for a disabled one, whose helpers do nothing.
    """

    def __init__(self, provider: trace.TracerProvider | None, *, owned: bool = False) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._owned = owned
        self._tracer = provider.get_tracer(_INSTRUMENTATION) if provider is not None else None

    # -- construction ----------------------------------------------------------------

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    @classmethod
    def from_provider(cls, provider: trace.TracerProvider | None = None) -> Tracing:
        """Spans through ``provider`` (the global provider by default: an application's
        own OpenTelemetry set-up, or a no-op one when it has none)."""
        return cls(provider if provider is not None else trace.get_tracer_provider())

    @classmethod
    def from_global(cls) -> Tracing:
        """Spans through the process's global tracer provider once one is set up (by the
        application, or :meth:`from_env` with ``set_global``); disabled while there is
        none, so spans cost nothing then."""
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return cls.disabled()
        return cls(provider)

    @classmethod
    def from_env(
        cls,
        service_name: str,
        *,
        endpoint: str | None = None,
        instance_id: str | None = None,
        env: Mapping[str, str] | None = None,
        set_global: bool = False,
    ) -> Tracing:
        """Tracing to ``endpoint`` or the endpoint the ``OTEL_*`` variables name;
        disabled (the SDK not imported) when there is none.

        ``OTEL_SERVICE_NAME`` overrides ``service_name``; ``OTEL_RESOURCE_ATTRIBUTES``
        and the sampler variables are honoured as usual. ``set_global`` also makes it
        the process's global provider, so spans of handler code nest under the
        execution span (do it once per process, in its entry point).
        """
        env = os.environ if env is None else env
        endpoint = endpoint or endpoint_from_env(env)
        if not endpoint:
            return cls.disabled()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes: dict[str, str] = {"service.name": env.get("OTEL_SERVICE_NAME") or service_name}
        if instance_id:
            attributes["service.instance.id"] = instance_id
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        if set_global:
            trace.set_tracer_provider(provider)
        _log.info("tracing to %s as %s", endpoint, attributes["service.name"])
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Exports what is buffered and stops (blocking: up to the exporter's timeout;
        from a coroutine use ``asyncio.to_thread``). Only for a provider made here."""
        if self._owned and self.provider is not None:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- spans -------------------------------------------------------------------------

    @contextlib.contextmanager
    def submit_span(
        self, type_: str, queue: str, *, tenant: str = "", count: int = 1, parent: str = ""
    ) -> Iterator[str]:
        """Around a submit: yields the ``traceparent`` to send with the task(s).

        The span is a child of ``parent`` (a W3C traceparent) when given, else of the
        caller's current span. Disabled, it yields ``parent`` or the caller's current
        context ("" when none), so a task still joins the application's own trace.
        """
        if self._tracer is None:
            yield parent or current_traceparent()
            return
        attributes: dict[str, str | int] = {
            ATTR_QUEUE: queue,
            ATTR_TYPE: type_,
            "messaging.system": "conveyor",
            "messaging.destination.name": queue,
            "messaging.batch.message_count": count,
        }
        if tenant:
            attributes[ATTR_TENANT] = tenant
        with self._tracer.start_as_current_span(
            f"submit {type_}",
            context=_parent(parent) if parent else None,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            yield _traceparent_of(span)

    def dispatch_spans(self, rows: Sequence[Row], *, start_time_ns: int | None = None) -> list[str]:
        """One ``dispatch`` span per leased attempt of a claim round; returns each
        attempt's ``traceparent`` for its assignment (the rows' own when disabled).

        Rows have ``traceparent``, ``id``, ``queue``, ``type``, ``attempt`` and
        ``tenant``. The spans start at ``start_time_ns`` (the round's start, from
        :func:`time.time_ns`) and end now.
        """
        if self._tracer is None:
            return [row["traceparent"] for row in rows]
        out: list[str] = []
        for row in rows:
            span = self._tracer.start_span(
                f"dispatch {row['type']}",
                context=_parent(row["traceparent"]),
                kind=SpanKind.PRODUCER,
                attributes=_task_attributes(
                    str(row["id"]), row["queue"], row["type"], row["attempt"], row["tenant"]
                ),
                start_time=start_time_ns,
            )
            out.append(_traceparent_of(span))
            span.end()
        return out

    @contextlib.contextmanager
    def execution_span(
        self,
        traceparent: str,
        *,
        task_id: str,
        queue: str,
        type_: str,
        attempt: int,
        tenant: str = "",
    ) -> Iterator[trace.Span | None]:
        """Current while a handler runs: a child of the assignment's ``traceparent``.

        Yields the span (None when disabled) for :meth:`record_outcome`. An exception
        escaping the block is recorded on it.
        """
        if self._tracer is None:
            yield None
            return
        with self._tracer.start_as_current_span(
            f"execute {type_}",
            context=_parent(traceparent),
            kind=SpanKind.CONSUMER,
            attributes=_task_attributes(task_id, queue, type_, attempt, tenant),
        ) as span:
            yield span

    @staticmethod
    def record_outcome(span: trace.Span | None, outcome: str, error: str = "") -> None:
        """Marks an execution span with the attempt's outcome (``succeeded``, ``failed``,
        ``timed_out``, ...); any outcome but ``succeeded`` sets an error status."""
        if span is None:
            return
        span.set_attribute(ATTR_OUTCOME, outcome)
        if outcome != "succeeded":
            span.set_status(Status(StatusCode.ERROR, error or outcome))

    # -- gRPC ----------------------------------------------------------------------------

    def server_interceptors(
        self, untraced: Sequence[str] = UNTRACED_RPC_PREFIXES
    ) -> list[grpc.aio.ServerInterceptor]:
        """A span per RPC served, child of the caller's (none when disabled), except the
        methods whose ``/service/method`` name starts with one of ``untraced``."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        prefixes = tuple(untraced)

        def traced(details: Any) -> bool:
            method = getattr(details, "method", "")
            if isinstance(method, bytes):
                method = method.decode()
            return not str(method).startswith(prefixes)

        make = cast("Callable[..., grpc.aio.ServerInterceptor]", aio_server_interceptor)
        return [make(tracer_provider=self.provider, filter_=traced)]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """A span per RPC made, with its context sent along (none when disabled)."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        make = cast("Callable[..., list[grpc.aio.ClientInterceptor]]", aio_client_interceptors)
        return make(tracer_provider=self.provider)


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the caller's current span ("" when there is none)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")
