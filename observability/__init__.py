"""Observability for Conveyor's processes: metrics, traces, structured logs, ``conveyor top``.

- :mod:`conveyor.observability.metrics`: every Prometheus metric, defined once and grouped
  per process (:class:`~conveyor.observability.metrics.CoordinatorMetrics`,
  :class:`~conveyor.observability.metrics.WorkerMetrics`), each on its own registry, with
  helpers that record a whole batch at a time, and the HTTP exposition server.
- :mod:`conveyor.observability.grpc_metrics`: a gRPC server interceptor timing every RPC.
- :mod:`conveyor.observability.tracing`: OpenTelemetry set-up from
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (nothing at all when unset) and the spans that link a
  submit, its dispatch and its execution through the task's W3C ``traceparent``.
- :mod:`conveyor.observability.logs`: text and JSON log lines carrying task fields.
- :mod:`conveyor.observability.top`: the rendering of ``conveyor top`` (data in, rich out).

The submodules are imported on demand: importing this package costs nothing.
"""
