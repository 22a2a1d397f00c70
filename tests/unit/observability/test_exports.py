"""The public names of conveyor.observability's modules, pinned: phase B and the
operators' docs build on them, so a rename must be deliberate."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "metrics": {
        "DEFAULT_TENANT", "DEPTH_STATES", "EVICTION_REASONS", "LATENCY_BUCKETS", "TASK_LABELS",
        "BatchHistogram", "CoordinatorMetrics", "MetricsServer", "QueueDepth", "Row",
        "WorkerMetrics", "WorkerPool", "WorkerProcessState", "call_on_loop", "metric_names",
        "parse_listen", "sample_names",
    },
    "tracing": {
        "ATTRIBUTES", "ATTR_ATTEMPT", "ATTR_OUTCOME", "ATTR_QUEUE", "ATTR_TASK_ID",
        "ATTR_TENANT", "ATTR_TYPE", "SERVICE_CLIENT", "SERVICE_COORDINATOR", "SERVICE_WORKER",
        "UNTRACED_RPC_PREFIXES", "Row", "Tracing", "current_traceparent", "endpoint_from_env",
    },
    "logs": {
        "FIELDS", "JSONFormatter", "LazyFields", "TaskFieldsFilter", "TaskLoggerAdapter",
        "TextFormatter", "bind_fields", "configure", "current_fields", "log_context",
        "task_logger",
    },
    "grpc_metrics": {"MetricsInterceptor"},
    "top": {
        "QueueRates", "QueueTotals", "QueueView", "ReplicaView", "Snapshot", "WorkerView",
        "rates", "render", "snapshot_from_protos", "totals_from_metrics",
    },
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exports(module: str) -> None:
    mod = importlib.import_module(f"conveyor.observability.{module}")
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
