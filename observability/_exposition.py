"""The Prometheus text exposition, built with each series' line prefix kept between scrapes.

``prometheus_client.generate_latest`` formats every sample from scratch at every scrape:
it validates and escapes the metric name and every label name and value, sorts the
labels and joins them, some 12 µs a sample on the development VM. A coordinator's page
has a few hundred samples, most of them the same series scrape after scrape, so each
scrape cost the coordinator about 4-5 ms of CPU, in a thread holding the GIL while
pickups waited (see docs/performance.md, issue 19).

:class:`Exposition` writes the same bytes (a test compares it with ``generate_latest``
on the same registry), but remembers each series' ``name{labels} `` prefix, its last
value and that value's line, and each family's ``# HELP``/``# TYPE`` lines: a scrape
formats only the values that changed. Values are read afresh at every scrape (the page
is never older than the request: nothing is cached but text), and the lines of series
that are gone are dropped at the next scrape, so the memory follows the live series.

A collector that renders its own text (``exposition_text()``: the
:class:`~conveyor.observability._histogram.BatchHistogram`, whose series are most of a
page's lines) is asked for it instead of ``collect()``: no Sample objects at all, and
the text of a series that did not change since the last scrape is reused whole.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from conveyor.observability._collectors import prefetch_sources
from conveyor.observability._lines import family_head, format_value, line_prefix, sample_line

__all__ = ["Exposition"]

# Samples that prometheus_client's text format moves into a gauge family of their own,
# after their family's samples.
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")

# OpenMetrics type -> the text format's (and whether the family name takes a suffix).
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}

_LineKey = tuple[str, tuple[tuple[str, str], ...]]
_HeadKey = tuple[str, str, str]


class Exposition:
    """Builds the text exposition (format 0.0.4) of one registry, fast."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry
        # prometheus_client keeps its collectors here (no public accessor): read to fetch
        # the loop-bound sources in one trip (an empty dict should the attribute go).
        self._collectors: dict[Collector, object] = getattr(registry, "_collector_to_names", {})
        # Per series: its ``name{labels} `` prefix, its last value and that value's line.
        self._lines: dict[_LineKey, tuple[str, float, str]] = {}
        self._heads: dict[_HeadKey, str] = {}
        # Scrapes may come in at once (one thread each): the caches are swapped whole,
        # under this lock, so no scrape sees a half-built one.
        self._lock = threading.Lock()

    def generate(self) -> bytes:
        """The page, as ``prometheus_client.generate_latest(registry)`` would write it."""
        with self._lock:
            old_lines, old_heads = self._lines, self._heads
        lines: dict[_LineKey, tuple[str, float, str]] = {}
        heads: dict[_HeadKey, str] = {}
        prefetch_sources(list(self._collectors))

        def line(sample: Sample) -> str:
            if sample.timestamp is not None:
                return sample_line(sample)  # rare (none of Conveyor's): the slow way
            # Labels in the collector's order: the same series always gives the same
            # order, and the sorting is done once, when the prefix is made.
            key = (sample.name, tuple(sample.labels.items()))
            value = sample.value
            known = lines.get(key) or old_lines.get(key)
            if known is None:
                prefix = line_prefix(sample)
            elif known[1] == value and type(known[1]) is type(value):
                lines[key] = known  # unchanged since the last scrape: its line as it was
                return known[2]
            else:
                prefix = known[0]
            text = f"{prefix}{format_value(value)}\n"
            lines[key] = (prefix, value, text)
            return text

        def head(name: str, type_: str, doc: str) -> str:
            key = (name, type_, doc)
            found = heads.get(key)
            if found is None:
                found = old_heads.get(key)
                if found is None:
                    found = family_head(name, type_, doc)
                heads[key] = found
            return found

        output: list[str] = []
        for metric in self._metrics(output):
            name, type_ = metric.name, metric.type
            if type_ == "counter":
                family = name + "_total"
            elif type_ == "info":
                family = name + "_info"
            else:
                family = name
            output.append(head(family, _TYPES.get(type_, type_), metric.documentation))
            extra: dict[str, list[str]] = {}
            for sample in metric.samples:
                for suffix in _OM_SUFFIXES:
                    if sample.name == name + suffix:
                        extra.setdefault(suffix, []).append(line(sample))
                        break
                else:
                    output.append(line(sample))
            for suffix, moved in sorted(extra.items()):
                output.append(head(name + suffix, "gauge", metric.documentation))
                output.extend(moved)
        with self._lock:
            self._lines, self._heads = lines, heads
        return "".join(output).encode("utf-8")

    def _metrics(self, output: list[str]) -> Iterator[Metric]:
        """The registry's families, in its order, as ``collect`` gives them, except that
        a collector that renders its own text (``exposition_text``, the
        ``BatchHistogram``) appends it to ``output`` in its place."""
        target_info = getattr(self._registry, "_target_info", None)
        if not self._collectors or target_info:
            yield from self._registry.collect()
            return
        for collector in list(self._collectors):
            render = getattr(collector, "exposition_text", None)
            if render is not None:
                output.append(render())
            else:
                yield from collector.collect()
