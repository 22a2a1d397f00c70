"""Named queries (coordinator/store/sql.py): compiled once, parameters by name, the fence named."""

from __future__ import annotations

import pytest

from conveyor.coordinator.store.sql import Fence, Query, compile_named, transpose, unnest


def test_named_parameters_become_positional_in_first_use_order() -> None:
    text, names = compile_named(
        "SELECT :b::text, x::int, 'a:literal''s :c' -- :comment\n, :a, :b FROM t"
    )
    assert names == ("b", "a")
    assert text == "SELECT $1::text, x::int, 'a:literal''s :c' -- :comment\n, $2, $1 FROM t"


def test_arguments_are_checked_by_name() -> None:
    query = Query("q", "SELECT :x, :y")
    assert query.args({"y": 2, "x": 1}) == [1, 2]
    with pytest.raises(TypeError, match=r"missing parameters \['y'\], unknown \['z'\]"):
        query.args({"x": 1, "z": 3})


def test_a_fenced_query_takes_the_fence_where_it_is_named() -> None:
    query = Query("fenced", "UPDATE t SET a = :a WHERE {fence} AND id = :id")
    assert query.fenced
    assert "conveyor_fence" in query.text
    assert query.args({"a": 1, "id": 7, "fence": Fence("c1", 42)}) == [1, "c1", 42, 7]
    with pytest.raises(TypeError):
        query.args({"a": 1, "id": 7})


def test_unnest_and_transpose_agree_on_columns() -> None:
    typed = (("id", "uuid"), ("n", "int"))
    assert unnest(typed, "r") == "unnest(:id::uuid[], :n::int[]) AS r(id, n)"
    assert transpose([("a", 1), ("b", 2)], ["id", "n"]) == {"id": ("a", "b"), "n": (1, 2)}
    assert transpose([], ["id", "n"]) == {"id": [], "n": []}
