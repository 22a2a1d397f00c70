"""conveyor bench's flow-control options: what each task carries, what the report says."""

from __future__ import annotations

from conveyor.bench.runner import BenchConfig, _flow


def test_no_flow_options_leave_tasks_and_report_as_they_were() -> None:
    cfg = BenchConfig()
    assert cfg.flow(7) == {}
    assert _flow(cfg) == ""


def test_keys_spread_tasks_round_robin_with_a_limit_that_never_binds() -> None:
    cfg = BenchConfig(workers=2, concurrency=500, concurrency_keys=3, rate_limit=1e6)
    keys = [cfg.flow(i)["concurrency_key"] for i in range(6)]
    assert keys == ["k0", "k1", "k2", "k0", "k1", "k2"]
    assert cfg.flow(0)["concurrency_limit"] == 1000  # every slot of every worker
    assert _flow(cfg) == ", rate limit 1e+06/s, 3 concurrency keys"
