"""conveyor bench's pickup histogram: every probe in exactly one bucket, bounds inclusive."""

from __future__ import annotations

from conveyor.bench.runner import _histogram_line, histogram


def test_each_value_lands_in_the_first_bucket_whose_bound_it_does_not_pass() -> None:
    buckets = histogram([0.4, 1.0, 1.01, 2.0, 9.9, 250.0], bounds=(1.0, 2.0, 10.0))
    assert buckets == {"<=1": 2, "<=2": 2, "<=10": 1, ">10": 1}


def test_the_default_buckets_count_every_probe_and_keep_their_order() -> None:
    values = [0.5 + 0.37 * i for i in range(400)]
    buckets = histogram(values)
    assert sum(buckets.values()) == len(values)
    assert list(buckets)[:3] == ["<=1", "<=2", "<=3"] and list(buckets)[-1] == ">100"
    assert _histogram_line(buckets).startswith("<=1 ms: 2, <=2 ms: 3, ")
    assert ": 0" not in _histogram_line(buckets)
