"""Hypothesis strategies that build any ``conveyor.v1`` request from its descriptor.

Every field gets values a hostile or buggy client could send: NUL and control characters,
long unicode, trailing newlines, numbers at and past every boundary, timestamps and
durations far outside what datetime can hold, enum numbers the proto does not define; and
well-formed requests with one timestamp, duration or number at the edge of its type
(:func:`one_edge`: the smallest and largest Timestamp and Duration, zero, negative, NaN,
infinity, the tiniest double). Some
fields (names, ids, cron expressions, zones) also draw well-formed values often enough
that requests get past the first check and reach the deeper code, and the store.

Strategies come from descriptors, so a field or RPC added to the proto is covered without
touching this file.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

# Characters PostgreSQL refuses (NUL), that break line-based formats, or that look alike.
NASTY = [
    "\x00",
    "\n",
    "\r",
    "\t",
    "\x1b",
    "\x7f",
    "\u0085",
    "\u2028",
    "\ufeff",
    "\u200b",
    "é",
    "😀",
]

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
nasty_text: st.SearchStrategy[str] = st.one_of(
    _text,
    st.builds(lambda a, c, b: a + c + b, _text, st.sampled_from(NASTY), _text),
    st.sampled_from(["", " ", "default\n", "\x00", "a" * 129, "é" * 300, "x" * 5000]),
)

NAMES = ["default", "echo", "q1", "a.b:c-d/e", "Z9"]
_names = st.one_of(st.sampled_from(NAMES), nasty_text)


def _uuid_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.uuids().map(str),
        st.uuids(version=4).map(lambda u: str(u).upper()),
        st.just(str(uuid.UUID(int=0))),
        nasty_text,
    )


# Field name -> strategy for string fields whose well-formed values matter.
STRING_HINTS: dict[str, st.SearchStrategy[str]] = {
    "queue": _names,
    "type": _names,
    "name": st.one_of(st.sampled_from(["nightly", "every-10s", "x"]), nasty_text),
    "queues": _names,
    "task_types": _names,
    "worker_id": st.one_of(st.sampled_from(["w1", "w2"]), nasty_text),
    "id": _uuid_text(),
    "task_id": _uuid_text(),
    "page_token": _uuid_text(),
    "idempotency_key": st.one_of(st.sampled_from(["", "k1", "k2"]), nasty_text),
    "content_type": st.one_of(st.sampled_from(["application/json", "text/plain"]), nasty_text),
    "cron": st.one_of(
        st.sampled_from(
            ["* * * * *", "*/10 * * * * *", "@hourly", "0 2 * * *", "61 * * * *", "* * *"]
        ),
        nasty_text,
    ),
    "time_zone": st.one_of(st.sampled_from(["", "UTC", "Europe/Berlin", "Mars/Base"]), nasty_text),
    "traceparent": st.one_of(
        st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), nasty_text
    ),
    "etag": st.one_of(st.sampled_from(["", "1", "2"]), nasty_text),
}


# Field name -> well-formed values, for requests that should get past validation.
GOOD_STRINGS: dict[str, st.SearchStrategy[str]] = {
    "queue": st.sampled_from(["", "default", "q1"]),
    "type": st.sampled_from(["echo", "report.build"]),
    "name": st.sampled_from(["nightly", "every-10s"]),
    "queues": st.sampled_from(["default", "q1"]),
    "task_types": st.sampled_from(["echo"]),
    "worker_id": st.sampled_from(["w1", "w2"]),
    "id": st.uuids(version=4).map(str),
    "task_id": st.uuids(version=4).map(str),
    "page_token": st.just(""),
    "idempotency_key": st.sampled_from(["", "", "k1", "k2"]),
    "content_type": st.sampled_from(["", "application/json"]),
    "cron": st.sampled_from(["* * * * *", "*/10 * * * * *", "@hourly", "0 2 * * *"]),
    "time_zone": st.sampled_from(["", "UTC", "Europe/Berlin"]),
    "traceparent": st.sampled_from(["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
    "etag": st.just(""),
    "paths": st.sampled_from(["cron", "time_zone", "task_template", "catch_up_limit"]),
}


def _good_scalar(field: FD) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_STRING:
        return GOOD_STRINGS.get(field.name, st.sampled_from(["", "x", "hello"]))
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=32)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0])
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values])
    return st.sampled_from([0, 1, 2, 3, 5, 10])


def _ints(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [v for v in (0, 1, -1, 2, 1000, 1001, -1001, 100_000, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_floats = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 100.0, 101.0, float("nan"), float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True),
)


# Fixed once: a strategy must draw the same way every time (Hypothesis replays examples).
_NOW = int(time.time())


def _good_timestamp_fields() -> st.SearchStrategy[dict[str, int]]:
    # Within a month of now: run_at and a schedule's start and end are bounded.
    now = _NOW
    return st.fixed_dictionaries(
        {
            "seconds": st.integers(now - 30 * 86_400, now + 30 * 86_400),
            "nanos": st.integers(0, 999_999_999),
        }
    )


def _good_duration_fields() -> st.SearchStrategy[dict[str, int]]:
    return st.fixed_dictionaries({"seconds": st.integers(1, 3600), "nanos": st.integers(0, 999)})


# Message fields whose parts depend on each other, as wholes that are well-formed.
GOOD_MESSAGES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "retry_policy": st.sampled_from(
        [
            {},
            {"initial_backoff": {"seconds": 1}, "max_backoff": {"seconds": 60}},
            {"multiplier": 1.5, "jitter": 0.1},
        ]
    ),
}


def _timestamp_fields() -> st.SearchStrategy[dict[str, int]]:
    seconds = st.one_of(
        st.sampled_from([0, -62_135_596_800, 253_402_300_799, 253_402_300_800, 4_102_444_800]),
        st.integers(1_700_000_000, 1_900_000_000),
        st.integers(*INT64),
    )
    nanos = st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1]), st.integers(*INT32))
    return st.fixed_dictionaries({"seconds": seconds, "nanos": nanos})


def _duration_fields() -> st.SearchStrategy[dict[str, int]]:
    seconds = st.one_of(
        st.sampled_from([0, 1, 30, 86_400, 86_401, 315_576_000_001, -1]), st.integers(*INT64)
    )
    nanos = st.one_of(st.sampled_from([0, 1, 999_999_999, -1]), st.integers(*INT32))
    return st.fixed_dictionaries({"seconds": seconds, "nanos": nanos})


# -- edges: the extremes of each type, where layers that each hold a value disagree --------

# The smallest and largest Timestamp (asyncpg stores them as -infinity and infinity),
# the last nanosecond of the largest, the Unix epoch and a second before it, a year 9999
# instant a zone east of UTC pushes past datetime's range, the edges of the coordinator's
# time range (1970-01-01, 9000-01-01) and a second past them; and nanos out of range.
EDGE_TIMESTAMPS = [
    {"seconds": -62_135_596_800},
    {"seconds": 253_402_300_799, "nanos": 999_999_999},
    {"seconds": 253_402_300_799, "nanos": 999_999_998},
    {"seconds": 253_402_300_799},
    {"seconds": 253_402_300_799 - 5 * 3600},
    {"seconds": 0},
    {"seconds": -1},
    {"seconds": 0, "nanos": 999_999_999},
    {"seconds": 221_845_392_000},
    {"seconds": 221_845_392_000, "nanos": 1},
    {"seconds": 221_845_392_001},
    {"seconds": 253_402_300_800},
    {"seconds": -62_135_596_801},
    {"seconds": INT64[1]},
    {"seconds": INT64[0]},
    {"seconds": 0, "nanos": -1},
    {"seconds": 0, "nanos": 1_000_000_000},
]
# The largest and smallest Duration, a nanosecond, zero, negative, a day and a nanosecond
# past it, and seconds and nanos of opposite signs.
EDGE_DURATIONS = [
    {"seconds": 315_576_000_000, "nanos": 999_999_999},
    {"seconds": -315_576_000_000, "nanos": -999_999_999},
    {"nanos": 1},
    {},
    {"seconds": -1},
    {"nanos": -1},
    {"seconds": 86_400},
    {"seconds": 86_400, "nanos": 1},
    {"seconds": 1, "nanos": -1},
    {"seconds": INT64[1]},
]
EDGE_DOUBLES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    5e-324,
    1e-300,
    1e-12,
    0.000_999,
    0.001,
    1e9,
    1e10,
    1e308,
    1.7976931348623157e308,
    -1e-300,
]


def _edge_ints(bounds: tuple[int, int]) -> list[int]:
    low, high = bounds
    return [
        v
        for v in (low, high, 0, -1, 1, low + 1, high - 1, 2**62, 2**62 + 1, 2**31, 2**31 - 1)
        if low <= v <= high
    ]


def _edge_scalar(field: FD) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.sampled_from(EDGE_DOUBLES)
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_ENUM):
        return st.sampled_from(_edge_ints(INT32))
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.sampled_from(_edge_ints(UINT32))
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.sampled_from(_edge_ints(UINT64))
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.sampled_from(_edge_ints(INT64))
    return _scalar(field)


def _has_edge(field: FD, depth: int) -> bool:
    """Whether a field is, or holds, a timestamp, duration or number (at this depth)."""
    if field.message_type is None:
        return field.type not in (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_BOOL)
    if field.message_type.GetOptions().map_entry or depth >= 3:
        return False
    return any(_has_edge(f, depth + 1) for f in field.message_type.fields)


def one_edge(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A well-formed request with one timestamp, duration or number, anywhere in it, at an
    edge of its type (the largest Timestamp in a schedule's end_time, a submit_rate of
    1e-300): values each layer holds alone, and the next one may not."""
    if desc.full_name == "google.protobuf.Timestamp":
        return st.sampled_from(EDGE_TIMESTAMPS)
    if desc.full_name == "google.protobuf.Duration":
        return st.sampled_from(EDGE_DURATIONS)
    candidates = [f for f in desc.fields if _has_edge(f, depth)]
    good = message_fields(desc, depth, good=True)
    if not candidates:
        return good

    def edge_of(field: FD) -> st.SearchStrategy[tuple[str, Any]]:
        if field.message_type is not None:
            cls = _message_class(field.message_type)
            inner = one_edge(field.message_type, depth + 1).map(lambda kw: cls(**kw))
            value: st.SearchStrategy[Any] = (
                st.lists(inner, min_size=1, max_size=2) if (field.is_repeated) else inner
            )
        else:
            scalar = _edge_scalar(field)
            value = st.lists(scalar, min_size=1, max_size=2) if field.is_repeated else scalar
        return value.map(lambda v: (field.name, v))

    edge = st.sampled_from(candidates).flatmap(edge_of)
    return st.tuples(good, edge).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]})


def _scalar(field: FD) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_STRING:
        return STRING_HINTS.get(field.name, nasty_text)
    if kind == FD.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [b"", b'{"a": 1}', b"\x00\xff", b"x" * (1 << 20), b"x" * ((1 << 20) + 1)]
            ),
        )
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return _floats
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints((-5, 50)))
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(INT32)
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _ints(UINT32)
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _ints(UINT64)
    return _ints(INT64)


def message_fields(
    desc: descriptor.Descriptor, depth: int = 0, *, good: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values (a subset of the fields) for ``desc``'s constructor.

    ``good`` draws only well-formed values, for requests that should pass validation.
    """
    if desc.full_name == "google.protobuf.Timestamp":
        return _good_timestamp_fields() if good else _timestamp_fields()
    if desc.full_name == "google.protobuf.Duration":
        return _good_duration_fields() if good else _duration_fields()
    if desc.full_name == "google.protobuf.FieldMask":
        path = GOOD_STRINGS["paths"] if good else st.one_of(GOOD_STRINGS["paths"], nasty_text)
        return st.fixed_dictionaries({"paths": st.lists(path, max_size=3)})
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        strategy = _field(field, depth, good)
        if strategy is None:
            continue
        # Well-formed requests carry their scalar fields (a task needs its type); any
        # field of a hostile one may be missing.
        if good and field.containing_oneof is None:
            required[field.name] = strategy
        else:
            optional[field.name] = strategy
    return st.fixed_dictionaries(required, optional=optional)


def _field(field: FD, depth: int, good: bool) -> st.SearchStrategy[Any] | None:
    scalar = _good_scalar if good else _scalar
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = scalar(field.message_type.fields_by_name["key"])
        value = scalar(field.message_type.fields_by_name["value"])
        if good:
            return st.dictionaries(st.sampled_from(["env", "team"]), value, max_size=2)
        return st.dictionaries(key, value, max_size=4) | st.just({f"k{i}": "v" for i in range(70)})
    if field.message_type is not None:
        if depth >= 3:
            return None
        if good and field.name in GOOD_MESSAGES:
            inner = GOOD_MESSAGES[field.name]
        else:
            inner = message_fields(field.message_type, depth + 1, good=good)
        cls = _message_class(field.message_type)
        one = inner.map(lambda kw: cls(**kw))
        if field.is_repeated:
            return st.lists(one, max_size=3)
        return one
    if field.is_repeated:
        return st.lists(scalar(field), max_size=4)
    return scalar(field)


def _message_class(desc: descriptor.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def requests(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Random requests of message class ``cls``: half hostile throughout, half well-formed
    with at most one hostile field (so the deeper code and the store see bad values too)."""
    desc = cls.DESCRIPTOR
    # The upb Descriptor the stubs also allow is an instance of this one at run time.
    assert isinstance(desc, descriptor.Descriptor)
    hostile = message_fields(desc)
    good = message_fields(desc, good=True)
    one_bad = st.tuples(good, hostile).map(lambda pair: _with_one_of(pair[0], pair[1]))
    edge = one_edge(desc)
    # One in seven hostile throughout; the rest well-formed, of those a third with one
    # bad field and a third with one value at the edge of its type. (one_of would favour
    # its first branch while generating.)
    mix = [hostile, good, good, one_bad, one_bad, edge, edge]
    return st.integers(0, len(mix) - 1).flatmap(lambda i: mix[i]).map(lambda kw: cls(**kw))


def _with_one_of(base: dict[str, Any], bad: dict[str, Any]) -> dict[str, Any]:
    if not bad:
        return base
    name = sorted(bad)[0]
    return {**base, name: bad[name]}
