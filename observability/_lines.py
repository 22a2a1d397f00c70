"""Lines of the Prometheus text exposition (format 0.0.4), written exactly as
``prometheus_client.generate_latest`` writes them; shared by the
:class:`~conveyor.observability._exposition.Exposition` and the collectors that render
their own text (:class:`~conveyor.observability._histogram.BatchHistogram`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from prometheus_client.openmetrics import exposition as om
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["family_head", "format_value", "line_prefix", "sample_line"]

format_value = cast(Callable[[float], str], floatToGoString)
"""A sample's value as the text format writes it."""


def sample_line(sample: Sample) -> str:
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
    return f"{name}{labels} {format_value(sample.value)}{timestamp}\n"


def _escape_value(value: str) -> str:
    """A label value, escaped as the text format wants (any UTF-8 allowed)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def line_prefix(sample: Sample) -> str:
    """``name{labels} `` of a sample line, as ``generate_latest`` writes it."""
    return sample_line(sample._replace(value=0.0, timestamp=None))[: -len("0.0\n")]


def family_head(name: str, type_: str, doc: str) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of a family, as ``generate_latest`` writes
    them (the type already in the text format's words)."""
    help_text = doc.replace("\\", r"\\").replace("\n", r"\n")
    escaped = om.escape_metric_name(name, om.UNDERSCORES)
    return f"# HELP {escaped} {help_text}\n# TYPE {escaped} {type_}\n"
