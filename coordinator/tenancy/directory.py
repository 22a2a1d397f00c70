"""What every coordinator keeps in memory of API keys and tenant limits, and how it stays
current: PostgreSQL LISTEN/NOTIFY, a reload on every (re)connect, a periodic full reload.

Calls are authenticated against this cache, never against the database, so a call costs
a dict lookup and one SHA-256. A change to ``api_keys`` or ``tenants`` (the admin API,
``conveyor keys --dsn``, plain SQL) fires a NOTIFY from a trigger at commit; this
coordinator's listener connection hears it and reloads those rows, so a new key works
and a revoked one stops working on every coordinator within a second (measured: see
docs/architecture.md). LISTEN/NOTIFY needs no etcd, so it serves single-node and etcd
clusters alike. What the listener could miss is covered twice: everything is reloaded
each time the listener (re)connects (after LISTEN, so nothing falls between), and every
``refresh`` seconds as a safety net; the listener connection is pinged every
``PING_INTERVAL`` so a dead one is noticed and replaced.

Listeners (``on_key_change``, ``on_tenant_change``) hear every key and tenant whose row
changed or disappeared, on every path above.

One bad row never stops the cache, which serves every tenant: a key row that cannot be
read is left out (it authenticates nothing), a tenant's limit outside its range
(``bounds.py``; rows written by hand, past validation) is left out (the coordinator's
default applies); each is said once in the log and counted in
``conveyor_rows_set_aside_total{loop="directory"}``, and every other row is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from conveyor.coordinator import bounds
from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.store import tenants as tenant_store
from conveyor.coordinator.store.db import Database
from conveyor.observability.metrics import CoordinatorMetrics

_log = logging.getLogger("conveyor.coordinator.directory")

PING_INTERVAL = 5.0
"""Seconds between checks that the listener connection is alive."""
CONNECT_TIMEOUT = 10.0
BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class CachedKey:
    """An API key as calls are checked against it."""

    id: str
    secret_hash: bytes
    tenant: str
    scopes: frozenset[str]
    expire_at: float | None
    """Expiry as a time.time() value; None: never."""
    revoked: bool

    def problem(self, now: float) -> str | None:
        """``revoked`` or ``expired`` when the key no longer works at ``now``, else None."""
        if self.revoked:
            return "revoked"
        if self.expire_at is not None and now >= self.expire_at:
            return "expired"
        return None


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def cached_key(row: asyncpg.Record) -> CachedKey:
    return CachedKey(
        id=row["id"],
        secret_hash=bytes(row["secret_hash"]),
        tenant=row["tenant"],
        scopes=frozenset(row["scopes"]),
        expire_at=_seconds(row["expire_time"]),
        revoked=row["revoke_time"] is not None,
    )


TenantLimitRow = dict[str, float | int | None]
"""A tenant's limits as set (None: the default), by column name."""


class Directory:
    """The key and tenant-limit cache of one coordinator; see the module docstring."""

    def __init__(
        self,
        db: Database,
        dsn: str,
        *,
        refresh: float,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._db = db
        self._dsn = dsn
        self._refresh = refresh
        self._metrics = metrics or CoordinatorMetrics.off()
        self._reported: set[tuple[str, str]] = set()
        """Bad rows said already (kind and id with the problem): each is said once."""
        self.keys: dict[str, CachedKey] = {}
        self.limits: dict[str, TenantLimitRow] = {}
        self._key_listeners: list[Callable[[str, CachedKey | None], None]] = []
        self._tenant_listeners: list[Callable[[str], None]] = []
        self._pending_keys: set[str] = set()
        self._pending_tenants: set[str] = set()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        """Full reloads done (start, reconnects, periodic)."""

    def on_key_change(self, listener: Callable[[str, CachedKey | None], None]) -> None:
        """``listener(key_id, key or None if it is gone)`` after a key's row changed."""
        self._key_listeners.append(listener)

    def on_tenant_change(self, listener: Callable[[str], None]) -> None:
        self._tenant_listeners.append(listener)

    async def start(self) -> None:
        """Loads everything, then keeps it current in the background."""
        await self.reload_all()
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="directory")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- applying changes --------------------------------------------------------------------

    def apply_keys(self, rows: Iterable[asyncpg.Record], asked: Iterable[str] = ()) -> None:
        """Takes these key rows; ids in ``asked`` without a (usable) row are gone."""
        found: dict[str, CachedKey] = {}
        unusable: list[str] = []
        for row in rows:
            try:
                found[row["id"]] = cached_key(row)
            except Exception as exc:  # one key row never stops the cache
                self._bad_row("key", row["id"], f"it cannot be read ({exc})")
                unusable.append(row["id"])
        for key_id in {*asked, *unusable} - found.keys():
            if self.keys.pop(key_id, None) is not None:
                self._key_changed(key_id, None)
        for key_id, key in found.items():
            if self.keys.get(key_id) != key:
                self.keys[key_id] = key
                self._key_changed(key_id, key)

    def apply_tenants(self, rows: Iterable[asyncpg.Record], asked: Iterable[str] = ()) -> None:
        found = {row["name"]: self._limits_of(row) for row in rows}
        for name in set(asked) - found.keys():
            if self.limits.pop(name, None) is not None:
                self._tenant_changed(name)
        for name, limits in found.items():
            if self.limits.get(name) != limits:
                self.limits[name] = limits
                self._tenant_changed(name)

    def _limits_of(self, row: asyncpg.Record) -> TenantLimitRow:
        """A tenant's limits as set, without those outside their range (the default
        applies to those)."""
        limits: TenantLimitRow = {}
        for column in tenant_store.LIMIT_COLUMNS:
            value = row[column]
            problem = None if value is None else bounds.limit_problem(column, value)
            if problem is not None:
                self._bad_row(
                    "tenant", row["name"], f"its {column} {value!r} {problem}; the default applies"
                )
                value = None
            limits[column] = value
        return limits

    def _bad_row(self, kind: str, name: str, problem: str) -> None:
        if (kind, f"{name}: {problem}") in self._reported:
            return
        self._reported.add((kind, f"{name}: {problem}"))
        _log.error(
            "%s %r left out of the cache: %s (a row written by hand, past validation: "
            "correct it); every other row is loaded",
            kind,
            name,
            problem,
        )
        self._metrics.count_set_aside("directory", 1)

    def _key_changed(self, key_id: str, key: CachedKey | None) -> None:
        for listener in self._key_listeners:
            try:
                listener(key_id, key)
            except Exception:
                _log.exception("a key-change listener failed (a bug)")

    def _tenant_changed(self, name: str) -> None:
        for listener in self._tenant_listeners:
            try:
                listener(name)
            except Exception:
                _log.exception("a tenant-change listener failed (a bug)")

    async def reload_all(self) -> None:
        async with self._db.read() as conn:
            keys = await key_store.load_all(conn)
            tenants = await tenant_store.load_all(conn)
        self.apply_keys(keys, asked=list(self.keys))
        self.apply_tenants(tenants, asked=list(self.limits))
        self.reloads += 1

    async def _reload_pending(self) -> None:
        keys, self._pending_keys = self._pending_keys, set()
        names, self._pending_tenants = self._pending_tenants, set()
        try:
            async with self._db.read() as conn:
                key_rows = await key_store.load_ids(conn, list(keys)) if keys else []
                tenant_rows = await tenant_store.load_names(conn, list(names)) if names else []
        except BaseException:
            self._pending_keys |= keys
            self._pending_tenants |= names
            raise
        self.apply_keys(key_rows, asked=keys)
        self.apply_tenants(tenant_rows, asked=names)

    # -- the listener ------------------------------------------------------------------------

    def _notified(
        self, conn: object, pid: int, channel: str, payload: object
    ) -> None:  # asyncpg's listener signature
        if channel == key_store.NOTIFY_CHANNEL:
            self._pending_keys.add(str(payload))
        else:
            self._pending_tenants.add(str(payload))
        self._dirty.set()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1:
                    _log.warning("key and tenant change listener lost (%s); reconnecting", exc)
            await asyncio.sleep(min(BACKOFF_MAX, 0.1 * 2**failures))

    async def _session(self) -> None:
        """One listener connection, until it breaks."""
        conn = await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": "conveyor-coordinator-listener"},
        )
        lost = asyncio.Event()

        def terminated(_conn: object) -> None:
            lost.set()
            self._dirty.set()  # wakes the loop below to reconnect (and reload) at once

        conn.add_termination_listener(terminated)
        try:
            await conn.add_listener(key_store.NOTIFY_CHANNEL, self._notified)
            await conn.add_listener(tenant_store.NOTIFY_CHANNEL, self._notified)
            # Listening from here on: a full reload now leaves no change unheard.
            await self.reload_all()
            loop = asyncio.get_running_loop()
            next_reload = loop.time() + self._refresh
            while not lost.is_set():
                timeout = min(PING_INTERVAL, max(0.0, next_reload - loop.time()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._dirty.wait()
                self._dirty.clear()
                if self._pending_keys or self._pending_tenants:
                    await self._reload_pending()
                if loop.time() >= next_reload:
                    await self.reload_all()
                    next_reload = loop.time() + self._refresh
                else:
                    await conn.fetchval("SELECT 1", timeout=PING_INTERVAL)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
            if not conn.is_closed():
                conn.terminate()
