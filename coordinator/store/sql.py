"""SQL in one shape: named statements with named parameters, the fence named where it goes.

A statement is written once, at import, as a :class:`Query` with ``:name`` parameters and,
if it is a dispatch-side write, the ``{fence}`` marker where the leader's fencing check
belongs. It is compiled then to asyncpg's positional form, so a call costs no more than
building its argument list::

    _PROMOTE = Query("promote_due", f'''
        UPDATE tasks t SET state = {PENDING} ... WHERE {FENCE} AND t.state = {SCHEDULED} ...
        LIMIT :limit''')
    rows = await _PROMOTE.fetch(conn, limit=500, fence=fence)

A fenced query takes ``fence=`` (a :class:`Fence`) and raises
:class:`~conveyor.coordinator.errors.Fenced` when the database says the epoch is stale, so
callers never translate that themselves. Task states and outcomes go into the text as
literals from constants (never bare numbers): the partial indexes (``WHERE state = 1``)
only match literal predicates.

(A small compiler rather than a query-builder library: the statements here are fixed
text, and compiling once keeps per-call cost at zero; buildpg and the like render per call.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from conveyor.coordinator.errors import Fenced

FENCE = "{fence}"
"""Where a statement checks the leader's epoch: an uncorrelated sub-select, which
PostgreSQL runs once, before touching any row (``conveyor_fence`` in migration 0001 takes
the leadership row FOR SHARE until the transaction ends, and raises CVF01 when stale)."""

FENCED_SQLSTATE = "CVF01"

# Test-only fault switch (CONVEYOR_UNSAFE_DISABLE_FENCING=1): every fence check passes.
# It exists so the failover tests can show their checker catches what fencing prevents.
UNSAFE_DISABLE_FENCING = os.environ.get("CONVEYOR_UNSAFE_DISABLE_FENCING") == "1"

_FENCE_CHECK = (
    "(:fence_cluster::text IS NOT NULL OR :fence_epoch::bigint > 0)"
    if UNSAFE_DISABLE_FENCING
    else "(SELECT conveyor_fence(:fence_cluster::text, :fence_epoch::bigint))"
)

# A :name parameter, skipping 'string literals', -- comments and :: casts.
_TOKEN = re.compile(r"'(?:[^']|'')*'|--[^\n]*|::|:([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Fence:
    """The fencing token of one leader: its cluster and epoch."""

    cluster: str
    epoch: int
    on_refused: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    """Called when the database refuses a write fenced with this token (for metrics)."""


def compile_named(text: str) -> tuple[str, tuple[str, ...]]:
    """``text`` with each ``:name`` replaced by ``$n``; and the names, in ``$n`` order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _TOKEN.sub(number, text), tuple(names)


class Query:
    """One named statement; see the module docstring."""

    __slots__ = ("_names", "fenced", "name", "params", "text")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.fenced = FENCE in text
        self.text, self.params = compile_named(text.replace(FENCE, _FENCE_CHECK))
        expected = set(self.params)
        if self.fenced:
            expected -= {"fence_cluster", "fence_epoch"}
            expected.add("fence")
        self._names = frozenset(expected)

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``values`` (by parameter name)."""
        if values.keys() != self._names:
            missing = sorted(self._names - values.keys())
            extra = sorted(values.keys() - self._names)
            raise TypeError(f"query {self.name}: missing parameters {missing}, unknown {extra}")
        if not self.fenced:
            return [values[name] for name in self.params]
        fence: Fence = values["fence"]
        return [
            fence.cluster
            if name == "fence_cluster"
            else fence.epoch
            if name == "fence_epoch"
            else values[name]
            for name in self.params
        ]

    async def fetch(self, conn: asyncpg.Connection, /, **values: Any) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await conn.fetch(self.text, *self.args(values))
        except asyncpg.PostgresError as exc:
            raise _translate(exc, values) from exc
        return rows

    async def fetchrow(self, conn: asyncpg.Connection, /, **values: Any) -> asyncpg.Record | None:
        try:
            row: asyncpg.Record | None = await conn.fetchrow(self.text, *self.args(values))
        except asyncpg.PostgresError as exc:
            raise _translate(exc, values) from exc
        return row

    async def fetchval(self, conn: asyncpg.Connection, /, **values: Any) -> Any:
        try:
            return await conn.fetchval(self.text, *self.args(values))
        except asyncpg.PostgresError as exc:
            raise _translate(exc, values) from exc

    async def execute(self, conn: asyncpg.Connection, /, **values: Any) -> str:
        try:
            status: str = await conn.execute(self.text, *self.args(values))
        except asyncpg.PostgresError as exc:
            raise _translate(exc, values) from exc
        return status

    def __repr__(self) -> str:
        return f"<Query {self.name}>"


def _translate(exc: asyncpg.PostgresError, values: Mapping[str, Any]) -> BaseException:
    if getattr(exc, "sqlstate", None) == FENCED_SQLSTATE and "fence" in values:
        fence: Fence = values["fence"]
        if fence.on_refused is not None:
            fence.on_refused()
        return Fenced(fence.epoch)
    return exc


def columns(names: Iterable[str], alias: str = "") -> str:
    """``a.x, a.y`` for a column tuple (without alias: ``x, y``)."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + name for name in names)


def unnest(typed: Sequence[tuple[str, str]], alias: str, *, numbered: bool = False) -> str:
    """``unnest(:x::T[], ...) AS alias(x, ...)``: one array parameter per (name, type).

    ``numbered`` adds a column ``i``, each element's position in the arrays from 0 (so a
    statement can say which of its inputs it matched)."""
    arrays = ", ".join(f":{name}::{pg_type}[]" for name, pg_type in typed)
    names = columns(name for name, _ in typed)
    if numbered:
        return (
            f"(SELECT *, n - 1 AS i FROM unnest({arrays}) WITH ORDINALITY AS u({names}, n))"
            f" AS {alias}"
        )
    return f"unnest({arrays}) AS {alias}({names})"


def transpose(records: Sequence[Sequence[Any]], names: Sequence[str]) -> dict[str, Any]:
    """Row tuples as one array per column, by name: the parameters of :func:`unnest`."""
    if not records:
        return {name: [] for name in names}
    return dict(zip(names, zip(*records, strict=True), strict=True))
