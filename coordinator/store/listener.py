"""A LISTEN connection of its own, kept up: what the caches and relays fed by NOTIFY share.

:func:`listening` opens a connection (named, so ``pg_stat_activity`` tells it apart),
listens on the given channels and yields it with an event set when it is lost; it is
closed (or cut) when the block ends. :func:`reconnecting` runs one such session after
another, backing off after failures and saying once that the connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg

_log = logging.getLogger("conveyor.coordinator.listener")

CONNECT_TIMEOUT = 5.0
BACKOFF_MAX = 5.0

Notified = Callable[[Any, int, str, Any], None]
"""asyncpg's listener callback: (connection, pid, channel, payload)."""


@contextlib.asynccontextmanager
async def listening(
    dsn: str,
    application_name: str,
    channels: Mapping[str, Notified],
    *,
    on_lost: Callable[[], None] = lambda: None,
) -> AsyncIterator[tuple[asyncpg.Connection, asyncio.Event]]:
    """A connection listening on ``channels``, and an event set when it is lost (when
    ``on_lost`` is called too)."""
    conn = await asyncpg.connect(
        dsn, timeout=CONNECT_TIMEOUT, server_settings={"application_name": application_name}
    )
    lost = asyncio.Event()

    def terminated(_conn: object) -> None:
        lost.set()
        on_lost()

    conn.add_termination_listener(terminated)
    try:
        for channel, callback in channels.items():
            await conn.add_listener(channel, callback)
        yield conn, lost
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2.0)
        if not conn.is_closed():
            conn.terminate()


async def reconnecting(
    session: Callable[[], Awaitable[None]], what: str, *, after: Callable[[], None]
) -> None:
    """Runs ``session`` again whenever it ends, ``after`` each, backing off on failures."""
    failures = 0
    while True:
        try:
            await session()
            failures = 0
        except Exception as exc:
            failures += 1
            if failures == 1:
                _log.warning("%s lost its connection (%s); reconnecting", what, exc)
        after()
        await asyncio.sleep(min(BACKOFF_MAX, 0.1 * 2**failures))
