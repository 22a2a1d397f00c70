"""Metric definitions and the batch recorders of conveyor.observability.metrics."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest

from conveyor.observability.metrics import (
    LATENCY_BUCKETS,
    BatchHistogram,
    CoordinatorMetrics,
    WorkerMetrics,
    metric_names,
    sample_names,
)

PENDING, SCHEDULED, RUNNING, SUCCEEDED, DEAD, CANCELLED = 1, 2, 3, 4, 5, 6
LABELS = {"tenant": "default", "queue": "q", "type": "t"}


def value(metrics: CoordinatorMetrics | WorkerMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def result_row(
    state: int, *, queue: str = "q", run: float | None = 0.5, e2e: float | None = None
) -> dict[str, object]:
    return {
        "tenant": "default",
        "queue": queue,
        "type": "t",
        "state": state,
        "run_seconds": run,
        "end_to_end_seconds": e2e,
    }


def test_batch_histogram_exposes_what_prometheus_client_histogram_would() -> None:
    values = [0.0, 0.001, 0.0011, 0.3, 0.5, 2.5, 7.0, 4000.0, 0.25]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("h_seconds", "doc", ("a",), buckets=LATENCY_BUCKETS, registry=ours)
    reference = Histogram("h_seconds", "doc", ("a",), buckets=LATENCY_BUCKETS, registry=theirs)
    batch.observe_many(("x",), values[:3])
    batch.observe_pairs([(("x",), values[3])])
    batch.observe_groups({("x",): values[4:], ("y",): [1.0]})
    for v in values:
        reference.labels("x").observe(v)
    reference.labels("y").observe(1.0)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert lines(ours) == lines(theirs)


def test_batch_histogram_rejects_wrong_label_count_and_bad_buckets() -> None:
    registry = CollectorRegistry()
    h = BatchHistogram("h_seconds", "doc", ("a", "b"), buckets=(1, 2), registry=registry)
    with pytest.raises(ValueError, match=r"expected labels \('a', 'b'\)"):
        h.observe(("only-one",), 1.0)
    with pytest.raises(ValueError, match=r"expected labels \('a', 'b'\)"):
        h.observe_pairs([(("a", "b", "c"), 1.0)])
    with pytest.raises(ValueError, match="distinct finite"):
        BatchHistogram("g_seconds", "doc", (), buckets=(1, 1), registry=registry)


def test_results_of_one_batch_are_counted_by_outcome_and_labels() -> None:
    m = CoordinatorMetrics(process_metrics=False)
    m.record_results(
        [
            result_row(SUCCEEDED, e2e=2.0),
            result_row(SUCCEEDED, e2e=3.0),
            result_row(SUCCEEDED, queue="other", e2e=1.0),
            result_row(SCHEDULED),
            result_row(DEAD, e2e=9.0),
            result_row(PENDING, run=None),
        ]
    )
    assert value(m, "conveyor_tasks_succeeded_total", **LABELS) == 2
    assert value(m, "conveyor_tasks_succeeded_total", **{**LABELS, "queue": "other"}) == 1
    assert value(m, "conveyor_tasks_failed_total", **LABELS) == 2
    assert value(m, "conveyor_tasks_retried_total", **LABELS) == 1
    assert value(m, "conveyor_tasks_dead_lettered_total", **LABELS) == 1
    assert value(m, "conveyor_tasks_requeued_total", **LABELS) == 1
    assert value(m, "conveyor_task_run_seconds_count", **LABELS) == 4
    assert value(m, "conveyor_task_run_seconds_sum", **LABELS) == pytest.approx(2.0)
    assert value(m, "conveyor_task_end_to_end_seconds_count", **LABELS) == 3
    assert value(m, "conveyor_task_end_to_end_seconds_sum", **LABELS) == pytest.approx(14.0)


def test_dispatch_submit_cancel_expiry_and_firings() -> None:
    m = CoordinatorMetrics(process_metrics=False)
    m.count_submitted([("default", "q", "t"), ("default", "q", "t"), ("default", "q", "u")])
    m.record_dispatched(
        [
            {**LABELS, "queue_wait_seconds": 0.01, "pickup_seconds": 0.02},
            {**LABELS, "queue_wait_seconds": 0.5, "pickup_seconds": None},
        ]
    )
    m.record_cancelled([LABELS])
    m.record_lease_expired([{**LABELS, "state": PENDING}, {**LABELS, "state": DEAD}])
    m.record_requeued([LABELS])
    m.record_firing_lags([("default", 0.2)] * 3)
    m.record_flush("submit", 40, 0.004)
    assert value(m, "conveyor_tasks_submitted_total", **LABELS) == 2
    assert value(m, "conveyor_tasks_submitted_total", **{**LABELS, "type": "u"}) == 1
    assert value(m, "conveyor_tasks_dispatched_total", **LABELS) == 2
    assert value(m, "conveyor_task_queue_wait_seconds_count", **LABELS) == 2
    assert value(m, "conveyor_task_pickup_latency_seconds_count", **LABELS) == 1
    assert value(m, "conveyor_tasks_cancelled_total", **LABELS) == 1
    assert value(m, "conveyor_tasks_lease_expired_total", **LABELS) == 2
    assert value(m, "conveyor_tasks_dead_lettered_total", **LABELS) == 1
    assert value(m, "conveyor_tasks_requeued_total", **LABELS) == 1
    assert value(m, "conveyor_schedule_firings_total", tenant="default") == 3
    assert value(m, "conveyor_schedule_firing_lag_seconds_count", tenant="default") == 3
    assert value(m, "conveyor_group_commit_items_sum", kind="submit") == 40
    assert value(m, "conveyor_group_commit_flush_seconds_count", kind="submit") == 1


def test_tuple_forms_refusals_and_worker_sessions() -> None:
    m = CoordinatorMetrics(process_metrics=False)
    m.count_submitted([("default", "q", "t")] * 4)
    m.record_firing_lags([("acme", 0.5), ("acme", 1.5)])
    m.record_refused(0)
    m.record_refused(3)
    m.worker_connected("default")
    m.worker_evicted("silent")
    assert value(m, "conveyor_tasks_submitted_total", **LABELS) == 4
    assert value(m, "conveyor_schedule_firings_total", tenant="acme") == 2
    assert value(m, "conveyor_schedule_firing_lag_seconds_sum", tenant="acme") == 2.0
    assert value(m, "conveyor_results_refused_total") == 3
    assert value(m, "conveyor_worker_sessions_total", tenant="default") == 1
    assert value(m, "conveyor_worker_evictions_total", reason="silent") == 1
    with pytest.raises(ValueError, match="is not one of"):
        m.worker_evicted("the worker was rude")  # free text would make unbounded labels


def test_leadership_series_exist_from_the_start_and_follow_office() -> None:
    m = CoordinatorMetrics(cluster="c1", process_metrics=False)
    assert value(m, "conveyor_leader", cluster="c1") == 0
    assert m.registry.get_sample_value("conveyor_leader_terms_total", {"cluster": "c1"}) == 0
    m.took_office(7)
    m.fenced()
    m.etcd_session_changed(True)
    assert value(m, "conveyor_leader", cluster="c1") == 1
    assert value(m, "conveyor_leader_epoch", cluster="c1") == 7
    assert value(m, "conveyor_leader_terms_total", cluster="c1") == 1
    assert value(m, "conveyor_fenced_writes_total", cluster="c1") == 1
    assert value(m, "conveyor_etcd_session_up", cluster="c1") == 1
    m.left_office()
    assert value(m, "conveyor_leader", cluster="c1") == 0


def test_worker_executions_are_grouped_per_batch() -> None:
    w = WorkerMetrics(process_metrics=False)
    w.record_executions(
        [("q", "t", "succeeded", 0.1), ("q", "t", "succeeded", 0.3), ("q", "t", "failed", 1.0)]
    )
    ok = {"queue": "q", "type": "t", "outcome": "succeeded"}
    assert value(w, "conveyor_worker_executions_total", **ok) == 2
    assert value(w, "conveyor_worker_execution_seconds_sum", **ok) == pytest.approx(0.4)
    assert value(w, "conveyor_worker_executions_total", **{**ok, "outcome": "failed"}) == 1
    w.reconnects.inc()
    assert value(w, "conveyor_worker_reconnects_total") == 1


def test_two_coordinators_in_one_process_do_not_share_or_touch_the_global_registry() -> None:
    a, b = CoordinatorMetrics(), CoordinatorMetrics()
    a.count_submitted([("default", "q", "t")])
    assert value(a, "conveyor_tasks_submitted_total", **LABELS) == 1
    assert value(b, "conveyor_tasks_submitted_total", **LABELS) == 0
    assert not {n for n in metric_names(REGISTRY) if n.startswith("conveyor_")}


def test_metrics_that_are_off_take_every_call_and_record_nothing() -> None:
    off = CoordinatorMetrics.off(cluster="c1")
    assert not off.enabled and not hasattr(off, "registry")
    public = [n for n, m in vars(CoordinatorMetrics).items() if callable(m) and n[0] != "_"]
    assert {"record_results", "record_flush", "took_office", "watch_queue_depth"} <= set(public)
    for name in public:  # a recorder added later is a no-op here too
        assert getattr(off, name)(object(), x=1) is None, name


@pytest.mark.parametrize("make", [CoordinatorMetrics, WorkerMetrics])
def test_names_follow_prometheus_conventions(make: type) -> None:
    metrics = make()
    families = [f for f in metrics.registry.collect() if f.name.startswith("conveyor_")]
    assert families
    for family in families:
        assert re.fullmatch(r"conveyor_[a-z_]+", family.name), family.name
        assert len(family.documentation) > 15, f"{family.name} needs help text"
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_items", "_bytes")), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client library adds it
    names = sample_names(metrics.registry)
    counters = [f.name for f in families if f.type == "counter"]
    assert all(f"{c}_total" in names for c in counters)
    # No unit-less time: every duration is in seconds.
    assert not [n for n in names if re.search(r"_(ms|milliseconds|minutes)(_|$)", n)]


def test_coordinator_exports_every_metric_the_issue_lists() -> None:
    names = sample_names(CoordinatorMetrics().registry)
    for name in [
        "conveyor_tasks_submitted_total",
        "conveyor_tasks_dispatched_total",
        "conveyor_tasks_succeeded_total",
        "conveyor_tasks_failed_total",
        "conveyor_tasks_retried_total",
        "conveyor_tasks_dead_lettered_total",
        "conveyor_tasks_cancelled_total",
        "conveyor_tasks_lease_expired_total",
        "conveyor_task_queue_wait_seconds_bucket",
        "conveyor_task_run_seconds_bucket",
        "conveyor_task_end_to_end_seconds_bucket",
        "conveyor_task_pickup_latency_seconds_bucket",
        "conveyor_group_commit_items_bucket",
        "conveyor_group_commit_flush_seconds_bucket",
        "conveyor_rpc_duration_seconds_bucket",
        "conveyor_worker_evictions_total",
        "conveyor_leader",
        "conveyor_leader_epoch",
        "conveyor_leader_terms_total",
        "conveyor_fenced_writes_total",
        "conveyor_etcd_session_up",
        "conveyor_schedule_firings_total",
        "conveyor_schedule_firing_lag_seconds_bucket",
        "process_cpu_seconds_total",
    ]:
        assert name in names, name


async def test_metrics_can_be_scraped_from_another_thread_while_recording() -> None:
    m = CoordinatorMetrics(process_metrics=False)

    def scrape_many() -> int:
        return sum(len(generate_latest(m.registry)) for _ in range(20))

    scraping = asyncio.create_task(asyncio.to_thread(scrape_many))
    for _ in range(200):
        m.record_results([result_row(SUCCEEDED, e2e=1.0)] * 10)
        await asyncio.sleep(0)
    assert await scraping > 0
    assert value(m, "conveyor_tasks_succeeded_total", **LABELS) == 2000
    assert value(m, "conveyor_task_run_seconds_count", **LABELS) == 2000
