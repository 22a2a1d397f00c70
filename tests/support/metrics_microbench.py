"""Micro-benchmark: what recording metrics costs per task on the coordinator's hot path.

    .venv/bin/python tests/support/metrics_microbench.py

Compares prometheus_client's one ``observe``/``inc`` per task with the batch recorders
of conveyor.observability.metrics (group by labels, one ``inc(n)`` per group, one lock per
histogram per batch), and prints microseconds per task against a budget: 5% of the
per-task time at the hot path's rate (``--rate``, tasks/s, default 50,000: 20 us a task,
so 1 us). A script, not a timed test: timings on a shared machine are not assertions.
"""

from __future__ import annotations

import argparse
import random
import timeit

from prometheus_client import CollectorRegistry, Counter, Histogram

from conveyor.observability.metrics import LATENCY_BUCKETS, TASK_LABELS, CoordinatorMetrics

SUCCEEDED, SCHEDULED = 4, 2


def rows(batch: int, queues: int, types: int) -> list[dict[str, object]]:
    rng = random.Random(1)
    return [
        {
            "tenant": "default",
            "queue": f"q{rng.randrange(queues)}",
            "type": f"t{rng.randrange(types)}",
            "state": SUCCEEDED if rng.random() < 0.95 else SCHEDULED,
            "run_seconds": rng.expovariate(20),
            "end_to_end_seconds": rng.expovariate(5),
        }
        for _ in range(batch)
    ]


def per_task_observe(batch: list[dict[str, object]]) -> None:
    """The naive way: per task, a labelled counter inc and two histogram observes."""
    registry = CollectorRegistry()
    succeeded = Counter("s_total", "s", TASK_LABELS, registry=registry)
    run = Histogram("r_seconds", "r", TASK_LABELS, buckets=LATENCY_BUCKETS, registry=registry)
    e2e = Histogram("e_seconds", "e", TASK_LABELS, buckets=LATENCY_BUCKETS, registry=registry)

    def record() -> None:
        for row in batch:
            labels = (row["tenant"], row["queue"], row["type"])
            succeeded.labels(*labels).inc()
            run.labels(*labels).observe(row["run_seconds"])  # type: ignore[arg-type]
            e2e.labels(*labels).observe(row["end_to_end_seconds"])  # type: ignore[arg-type]

    report("prometheus_client, one call per task", record, len(batch))


def batched(batch: list[dict[str, object]]) -> None:
    metrics = CoordinatorMetrics(process_metrics=False)
    report("CoordinatorMetrics.record_results", lambda: metrics.record_results(batch), len(batch))


def report(name: str, fn: object, tasks: int) -> None:
    timer = timeit.Timer(fn)  # type: ignore[arg-type]
    loops, _ = timer.autorange()
    best = min(timer.repeat(repeat=5, number=loops)) / loops
    us = best / tasks * 1e6
    verdict = "within" if us <= BUDGET_US else "OVER"
    print(f"  {name:45s} {us:6.3f} us/task  ({verdict} the {BUDGET_US:.2f} us budget)")


def main() -> None:
    global BUDGET_US
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50_000, help="hot path tasks/s")
    parser.add_argument("--queues", type=int, default=4)
    parser.add_argument("--types", type=int, default=8)
    args = parser.parse_args()
    BUDGET_US = 0.05 * 1e6 / args.rate
    for size in (1, 10, 100, 1000):
        batch = rows(size, args.queues, args.types)
        print(f"batch of {size} results ({args.queues} queues x {args.types} types):")
        per_task_observe(batch)
        batched(batch)


BUDGET_US = 1.0

if __name__ == "__main__":
    main()
