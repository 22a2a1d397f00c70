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
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from conveyor.observability._collectors import prefetch_sources

__all__ = ["Exposition"]

_format_value = cast(Callable[[float], str], floatToGoString)

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
                return _sample_line(sample)  # rare (none of Conveyor's): the slow way
            # Labels in the collector's order: the same series always gives the same
            # order, and the sorting is done once, when the prefix is made.
            key = (sample.name, tuple(sample.labels.items()))
            value = sample.value
            known = lines.get(key) or old_lines.get(key)
            if known is None:
                prefix = _prefix(sample)
            elif known[1] == value and type(known[1]) is type(value):
                lines[key] = known  # unchanged since the last scrape: its line as it was
                return known[2]
            else:
                prefix = known[0]
            text = f"{prefix}{_format_value(value)}\n"
            lines[key] = (prefix, value, text)
            return text

        def head(name: str, type_: str, doc: str) -> str:
            key = (name, type_, doc)
            found = heads.get(key)
            if found is None:
                found = old_heads.get(key)
                if found is None:
                    found = _head(name, type_, doc)
                heads[key] = found
            return found

        output: list[str] = []
        for metric in self._registry.collect():
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


def _sample_line(sample: Sample) -> str:
    """One sample line exactly as ``generate_latest`` writes it (its ``sample_line``,
    with its default escaping: names not valid in the legacy charset get underscores)."""
    if sample.labels:
        labels = ",".join(
            f'{om.escape_label_name(k, om.UNDERSCORES)}="{_escape_value(v)}"'
            for k, v in sorted(sample.labels.items())
        )
        labels = "{" + labels + "}"
    else:
        labels = ""
    timestamp = ""
    if sample.timestamp is not None:
        timestamp = f" {int(float(sample.timestamp) * 1000):d}"
    name = om.escape_metric_name(sample.name, om.UNDERSCORES)
    return f"{name}{labels} {_format_value(sample.value)}{timestamp}\n"


def _escape_value(value: str) -> str:
    """A label value, escaped as the text format wants (any UTF-8 allowed)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _prefix(sample: Sample) -> str:
    """``name{labels} `` of a sample line, as ``generate_latest`` writes it."""
    return _sample_line(sample._replace(value=0.0, timestamp=None))[: -len("0.0\n")]


def _head(name: str, type_: str, doc: str) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of a family, as ``generate_latest`` writes
    them (the type already in the text format's words)."""
    help_text = doc.replace("\\", r"\\").replace("\n", r"\n")
    escaped = om.escape_metric_name(name, om.UNDERSCORES)
    return f"# HELP {escaped} {help_text}\n# TYPE {escaped} {type_}\n"
