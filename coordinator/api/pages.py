"""One way to page a list (ListTasks, ListSchedules, ListApiKeys, ListAuditEvents).

A page of ``size`` is read as :func:`limit` rows, one more than it shows: that extra row
says whether another page exists, without a count. :func:`page` cuts the rows to the page
and makes the next page's token from its last row (``""`` on the last page), in each
list's own token format (the key the store pages by, opaque to the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def limit(size: int) -> int:
    """The rows to read for a page of ``size``."""
    return size + 1


def page(rows: list[T], size: int, token: Callable[[T], str]) -> tuple[list[T], str]:
    """The page of ``rows`` (read with :func:`limit`), and the next page's token."""
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, token(rows[-1])
