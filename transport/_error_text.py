"""The error text of an attempt: one limit and one cut, for the worker SDK and the coordinator.

The SDK cuts what it sends and the coordinator cuts what it stores with the same
function, so a text from the Python SDK arrives as it will be stored, and a worker in
another language gets the same treatment at the coordinator.
"""

from __future__ import annotations

__all__ = ["MAX_ERROR_BYTES", "storable_error"]

MAX_ERROR_BYTES = 8192
"""Cap on an attempt's error text, in UTF-8 bytes: it is stored with every attempt, and a
deep traceback can be large."""
_TRUNCATED = "\n[... truncated ...]\n"


def storable_error(text: str) -> str:
    """``text`` as PostgreSQL takes it: no NUL, valid UTF-8, at most MAX_ERROR_BYTES bytes.

    PostgreSQL text cannot hold NUL (shown as ``\\x00`` instead), a lone surrogate (from a
    badly decoded file name, say) is no UTF-8 (shown as ``?``), and a long text is cut in
    the middle with a marker, keeping its head (the exception line) and its tail (where it
    was raised).
    """
    if len(text) <= MAX_ERROR_BYTES // 4 and "\x00" not in text and text.isascii():
        return text  # the usual short message: nothing to encode or cut
    data = text.replace("\x00", "\\x00").encode("utf-8", "replace")
    if len(data) <= MAX_ERROR_BYTES:
        return data.decode("utf-8")
    marker = _TRUNCATED.encode()
    head = MAX_ERROR_BYTES // 4
    tail = MAX_ERROR_BYTES - head - len(marker)
    # A cut may split a character; "ignore" drops its partial bytes.
    return (data[:head] + marker + data[-tail:]).decode("utf-8", "ignore")
