"""Task ids: UUIDv7 (RFC 9562), time-ordered so the primary key index stays append-mostly.

Python 3.11's uuid module has no uuid7; the layout is twelve lines, so it is written here
rather than adding a dependency.
"""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    """Returns a new UUIDv7: 48 bits of Unix milliseconds, then 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)


def parse_task_id(text: str) -> uuid.UUID | None:
    """Parses a task id in canonical form; None when it is not one."""
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError):
        return None
