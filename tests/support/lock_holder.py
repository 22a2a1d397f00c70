"""A lock holder for the fencing test: ``python lock_holder.py ADDRESS DSN NAME TTL``.

Takes the lock ``NAME`` (``AsyncClient.lock``), prints ``acquired <token>``, then writes
its name under the lock's fencing token to the example resource (the ``resource`` table,
each write checked with ``pg_ledger.check_fencing_token`` in its transaction) every 50 ms
until the resource refuses the token: then it prints ``refused <token>`` and exits.

On SIGUSR1 it stops itself (SIGSTOP) after its next committed write, still believing it
holds the lock: paused by the test's SIGSTOP instead, it could stop inside a write's
transaction, holding the resource row's lock, and the test's own write would wait for
it forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg

from conveyor.client import AsyncClient
from conveyor.worker import pg_ledger


async def write(conn: asyncpg.Connection, name: str, value: str, token: int) -> None:
    """The example resource: a write that checks its fencing token in its transaction."""
    async with conn.transaction():
        await pg_ledger.check_fencing_token(conn, f"lock:{name}", token)
        await conn.execute(
            """
            INSERT INTO resource (name, value, fencing_token) VALUES ($1, $2, $3)
            ON CONFLICT (name) DO UPDATE SET value = $2, fencing_token = $3
            """,
            name,
            value,
            token,
        )


async def main(address: str, dsn: str, name: str, ttl: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        pause = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, pause.set)
        async with AsyncClient(address) as client, client.lock(name, ttl) as lock:
            print(f"acquired {lock.fencing_token}", flush=True)
            while True:
                try:
                    await write(conn, name, f"holder-{os.getpid()}", lock.fencing_token)
                except pg_ledger.StaleFencingTokenError:
                    print(f"refused {lock.fencing_token}", flush=True)
                    return
                if pause.is_set():
                    pause.clear()
                    os.kill(os.getpid(), signal.SIGSTOP)  # between transactions
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
