"""The first key: how a cluster that requires keys gets its first admin key.

Three ways, all ending as an ``api_keys`` row (and an audit row, in the same transaction):

- ``conveyor keys create --dsn ... --tenant ops --scope admin``, against the database
  (:func:`create_key_in_database`); running coordinators learn the key through NOTIFY;
- a coordinator started with a bootstrap key (``CONVEYOR_BOOTSTRAP_KEY`` or
  ``--bootstrap-key-file``; make one with ``conveyor keys generate``): at start it adds the
  key, with every scope, unless a key with its id exists (:func:`ensure_bootstrap_key`);
  a revoked bootstrap key stays revoked, so revoking it is how it is retired;
- ``conveyor dev`` does the latter with a key it keeps in its data directory.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from conveyor.coordinator.api.security_admin import create_key
from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.config import ConfigError
from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.store import audit as audit_store
from conveyor.coordinator.tenancy import keys as api_keys

_log = logging.getLogger("conveyor.coordinator.bootstrap")

BOOTSTRAP = "bootstrap"
FROM_DSN = "dsn"


def _operator() -> str:
    """Who runs this command, for the audit row of a change made straight in the database."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def ensure_bootstrap_key(conn: asyncpg.Connection, key: str, tenant: str) -> None:
    """Adds ``key`` with every scope for ``tenant`` unless a key with its id exists.

    Raises:
        ConfigError: The id is taken by another key (a different secret).
    """
    key_id = api_keys.parse(key)
    if key_id is None:
        raise ConfigError("the bootstrap key is not a Conveyor API key (cvk_<id>_<secret>)")
    async with conn.transaction():
        existing = await key_store.get(conn, key_id)
        if existing is not None:
            if not api_keys.secret_matches(key, bytes(existing["secret_hash"])):
                raise ConfigError(
                    f"the bootstrap key's id {key_id} belongs to another key; make a new "
                    "bootstrap key with: conveyor keys generate"
                )
            if existing["revoke_time"] is not None:
                _log.warning("the bootstrap key %s is revoked; it stays revoked", key_id)
            return
        await key_store.insert(
            conn,
            key_id=key_id,
            secret_hash=api_keys.secret_hash(key),
            tenant=tenant,
            scopes=api_keys.ALL_SCOPES,
            description="bootstrap key",
            created_by=BOOTSTRAP,
            expire_time=None,
        )
        await audit_store.append(
            conn,
            [
                Event.make(
                    tenant=tenant,
                    key_id=key_id,
                    action="api_key.bootstrap",
                    target=f"{tenant}/{key_id}",
                    peer=socket.gethostname(),
                )
            ],
        )
    _log.info("added the bootstrap key %s (tenant %s, every scope)", key_id, tenant)


async def create_key_in_database(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    scopes: Sequence[str],
    description: str,
    expire_time: datetime | None,
) -> tuple[asyncpg.Record, str]:
    """``conveyor keys create --dsn``: a key and its audit row, in one transaction."""
    async with conn.transaction():
        row, key = await create_key(
            conn,
            tenant=tenant,
            scopes=scopes,
            description=description,
            created_by=FROM_DSN,
            expire_time=expire_time,
        )
        await audit_store.append(
            conn,
            [
                Event.make(
                    tenant="",
                    key_id="",
                    action="api_key.create",
                    target=f"{tenant}/{row['id']}",
                    peer=_operator(),
                    detail="with --dsn; scopes=" + ",".join(scopes),
                )
            ],
        )
    return row, key


async def revoke_key_in_database(conn: asyncpg.Connection, key_id: str) -> asyncpg.Record | None:
    """``conveyor keys revoke --dsn``: the revocation and its audit row, in one transaction."""
    async with conn.transaction():
        row = await key_store.revoke(conn, key_id)
        await audit_store.append(
            conn,
            [
                Event.make(
                    tenant="",
                    key_id="",
                    action="api_key.revoke",
                    target=f"{row['tenant']}/{key_id}" if row else key_id,
                    outcome="OK" if row else "API_KEY_NOT_FOUND",
                    peer=_operator(),
                    detail="with --dsn",
                )
            ],
        )
    return row
