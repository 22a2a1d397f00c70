"""Log set-up for Conveyor's processes: text for people, JSON lines for log collectors.

Task fields (:data:`FIELDS`: ``task_id``, ``attempt``, ``queue``, ``type``,
``worker_id``, ``tenant``, ``epoch``) reach a log line in two ways, and become top-level
keys of its JSON object (and ``key=value`` pairs after a text line's message):

- :func:`log_context` sets them for a block of code through a context variable, so
  every logger used inside it (the handler's own ``logging.getLogger(__name__)``
  included) adds them. Each asyncio task has its own copy, and the worker SDK runs sync
  handlers in ``contextvars.copy_context()``, so concurrent tasks never mix fields.
- :func:`task_logger` (a :class:`logging.LoggerAdapter`) binds them to one logger, for a
  handler that is given a logger rather than running inside the context.

The worker SDK binds a task's fields with :func:`bind_fields` and a :class:`LazyFields`
at the start of each task's own asyncio task: one context variable set, and the fields
are computed only if the task logs something.

A field given with ``extra=`` on a call wins over both. The JSON line also carries the
current OpenTelemetry ``trace_id`` and ``span_id`` when a span is active, so a log line
leads to its trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

__all__ = [
    "FIELDS",
    "JSONFormatter",
    "LazyFields",
    "TaskFieldsFilter",
    "TaskLoggerAdapter",
    "TextFormatter",
    "bind_fields",
    "configure",
    "current_fields",
    "log_context",
    "task_logger",
]

#: The task fields a log line can carry, in the order text lines show them.
FIELDS = ("task_id", "attempt", "queue", "type", "worker_id", "tenant", "epoch")
_FIELD_SET = frozenset(FIELDS)

_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "conveyor_log_fields", default=MappingProxyType({})
)

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
TEXT_DATE_FORMAT = "%H:%M:%S"


def _check(fields: Mapping[str, object]) -> None:
    unknown = set(fields) - _FIELD_SET
    if unknown:
        raise TypeError(f"unknown log field(s) {sorted(unknown)}; the fields are {FIELDS}")


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Adds ``fields`` to every log line written inside the block (nested blocks add to
    the outer one's fields; ``None`` values are left out)."""
    _check(fields)
    merged = {**_fields.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _fields.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _fields.reset(token)


class LazyFields(Mapping[str, object]):
    """Log fields made by ``make`` the first time a log line reads them (then kept).

    ``make`` must return only names of :data:`FIELDS` (not checked: it runs when a line
    is written, where an error would lose the line).
    """

    __slots__ = ("_fields", "_make")

    def __init__(self, make: Callable[[], Mapping[str, object]]) -> None:
        self._make = make
        self._fields: Mapping[str, object] | None = None

    def _get(self) -> Mapping[str, object]:
        if self._fields is None:
            self._fields = self._make()
        return self._fields

    def __getitem__(self, key: str) -> object:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def bind_fields(fields: Mapping[str, object]) -> None:
    """Makes ``fields`` the log fields of the rest of the running context, replacing any.

    For code that owns its context, such as an asyncio task started for one piece of
    work (each task runs in a copy of its creator's context, so nothing leaks out of
    it); everything else should use the :func:`log_context` block.
    """
    _fields.set(fields)


def current_fields() -> Mapping[str, object]:
    """The fields :func:`log_context` set for the running code."""
    return _fields.get()


class TaskLoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds fixed task fields to each line (``extra=`` on a call wins)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        bound = self.extra or {}
        kwargs["extra"] = {**bound, **(kwargs.get("extra") or {})}
        return msg, kwargs


def task_logger(logger: logging.Logger | str, **fields: object) -> TaskLoggerAdapter:
    """A logger whose lines carry ``fields`` (see :data:`FIELDS`)."""
    _check(fields)
    if isinstance(logger, str):
        logger = logging.getLogger(logger)
    return TaskLoggerAdapter(logger, {k: v for k, v in fields.items() if v is not None})


class TaskFieldsFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto each record (a handler filter: it runs
    in the logging call's own context, so it sees that task's fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, field_value in _fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, field_value)
        return True


def _record_fields(record: logging.LogRecord) -> dict[str, object]:
    fields = {}
    for key in FIELDS:
        field_value = getattr(record, key, None)
        if field_value is not None:
            fields[key] = field_value
    # A record made outside a handler with the filter still gets the context's fields.
    for key, field_value in _fields.get().items():
        fields.setdefault(key, field_value)
    return fields


def _trace_ids() -> dict[str, str]:
    # Only when OpenTelemetry is loaded already: a log line never imports it.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class TextFormatter(logging.Formatter):
    """``12:00:00 INFO  name: message``, then the task fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _record_fields(record)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{head} [{pairs}]{newline}{rest}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, the task fields as
    their own keys, trace ids, and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            # ISO 8601 in UTC with milliseconds, as log pipelines parse it without a hint.
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_record_fields(record))
        entry.update(_trace_ids())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Sends the root logger's lines to ``stream`` (stderr) as ``fmt`` (text or json).

    Replaces the root logger's handlers, so calling it again switches format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not one of: text, json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskFieldsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncio's own chatter is rarely what an operator wants at info.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
