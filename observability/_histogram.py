"""A Prometheus histogram that takes a whole batch of observations under one lock.

``prometheus_client.Histogram.observe`` takes a lock and walks the buckets in Python for
every value; the coordinator observes a run time, a queue wait and an end-to-end latency
for every task of every batch, so that would be three locked calls per task on the hot
path. Here a batch is bucketed with :func:`bisect.bisect_left` (in C) outside the lock and
added under one lock acquisition; the exposition (cumulative buckets, ``_sum``,
``_count``) is the standard one, so dashboards cannot tell the difference.

A scrape reads it as text (:meth:`BatchHistogram.exposition_text`, which the
:class:`~conveyor.observability._exposition.Exposition` prefers to ``collect``): each
series' lines are rendered from its arrays with their ``name{labels,le=...} `` prefixes
made once, kept, and rendered again only when the series changed; a histogram observed
by nobody since the last scrape gives its last text back at once. No Sample object is
made for any of it.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import cast

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from conveyor.observability._lines import family_head, line_prefix

__all__ = ["BatchHistogram"]

# The client library's own formatting of bucket bounds (untyped there).
_format_bound = cast(Callable[[float], str], floatToGoString)


_Text = tuple[list[int], float, str]
"""A series' counts and sum when its text was rendered, and the text."""


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        # Per bucket, not cumulative: the last slot is the +Inf overflow.
        self.counts = [0] * size
        self.sum = 0.0


class BatchHistogram(Collector):
    """A labelled histogram observed by batches; registers itself on ``registry``.

    Label values are given as a tuple in ``labelnames`` order. Values are in the
    metric's base unit (seconds, bytes, items).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {buckets!r}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._les = [_format_bound(b) for b in bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        # Bumped under the lock by every observation: the text needs rendering again.
        self._changes = 0
        # The exposition's state, under its own lock (scrapes may overlap).
        self._text_lock = threading.Lock()
        self._rendered_at = -1
        self._page = ""
        self._texts: dict[tuple[str, ...], _Text] = {}
        self._prefixes: dict[tuple[str, ...], tuple[list[str], str, str]] = {}
        self._head = family_head(name, "histogram", documentation)
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """One observation (a per-batch value such as a flush time, a call's duration)."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                self._check_labels(labels)
                series = self._series[labels] = _Series(len(self._bounds) + 1)
            series.counts[index] += 1
            series.sum += value
            self._changes += 1

    def observe_many(self, labels: tuple[str, ...], values: Iterable[float]) -> None:
        """Observations that share one label set, under one lock."""
        self.observe_groups({labels: values})

    def observe_pairs(self, pairs: Sequence[tuple[tuple[str, ...], float]]) -> None:
        """(labels, value) observations of a batch, under one lock.

        The cheapest form for a batch whose rows carry their own labels: no grouping
        first. Label tuples must have the right length (not checked per pair).
        """
        if not pairs:
            return
        bounds = self._bounds
        size = len(bounds) + 1
        series_of = self._series
        with self._lock:
            self._changes += 1
            for labels, value in pairs:
                series = series_of.get(labels)
                if series is None:
                    self._check_labels(labels)
                    series = series_of[labels] = _Series(size)
                series.counts[bisect_left(bounds, value)] += 1
                series.sum += value

    def _check_labels(self, labels: tuple[str, ...]) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {self.labelnames}, got values {labels!r}"
            )

    def observe_groups(self, groups: Mapping[tuple[str, ...], Iterable[float]]) -> None:
        """Observations of several label sets, under one lock for all of them."""
        bounds = self._bounds
        prepared: list[tuple[tuple[str, ...], list[int], float]] = []
        for labels, values in groups.items():
            self._check_labels(labels)
            batch = values if isinstance(values, list | tuple) else list(values)
            if batch:
                prepared.append((labels, [bisect_left(bounds, v) for v in batch], sum(batch)))
        if not prepared:
            return
        size = len(bounds) + 1
        with self._lock:
            self._changes += 1
            for labels, indexes, total in prepared:
                series = self._series.get(labels)
                if series is None:
                    series = self._series[labels] = _Series(size)
                counts = series.counts
                for i in indexes:
                    counts[i] += 1
                series.sum += total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(labels, list(s.counts), s.sum) for labels, s in self._series.items()]
        for labels, counts, total in sorted(snapshot):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(labels), buckets, total)
        yield family

    def exposition_text(self) -> str:
        """The family's text exposition (format 0.0.4), byte for byte what
        ``generate_latest`` writes of :meth:`collect`'s family."""
        with self._text_lock:
            with self._lock:
                changes = self._changes
                if changes == self._rendered_at:
                    return self._page
                snapshot = [(labels, list(s.counts), s.sum) for labels, s in self._series.items()]
            old, texts = self._texts, {}
            parts = [self._head]
            for labels, counts, total in sorted(snapshot):
                known = old.get(labels)
                if known is None or known[1] != total or known[0] != counts:
                    known = (counts, total, self._render(labels, counts, total))
                texts[labels] = known
                parts.append(known[2])
            self._texts, self._rendered_at = texts, changes
            self._page = "".join(parts)
            return self._page

    def _render(self, labels: tuple[str, ...], counts: list[int], total: float) -> str:
        prefixes = self._prefixes.get(labels)
        if prefixes is None:
            named = dict(zip(self.labelnames, labels, strict=True))
            buckets = [
                line_prefix(Sample(f"{self.name}_bucket", {**named, "le": le}, 0.0))
                for le in self._les
            ]
            count = line_prefix(Sample(f"{self.name}_count", named, 0.0))
            sum_ = line_prefix(Sample(f"{self.name}_sum", named, 0.0))
            prefixes = self._prefixes[labels] = (buckets, count, sum_)
        buckets, count, sum_ = prefixes
        cumulative = 0
        out: list[str] = []
        for prefix, n in zip(buckets, counts, strict=True):
            cumulative += n
            out.append(f"{prefix}{_format_bound(float(cumulative))}\n")
        # As HistogramMetricFamily: no _count and _sum when a bucket bound is negative.
        if self._bounds[0] >= 0:
            out.append(f"{count}{_format_bound(float(cumulative))}\n")
            out.append(f"{sum_}{_format_bound(total)}\n")
        return "".join(out)
