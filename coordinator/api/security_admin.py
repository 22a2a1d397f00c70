"""The AdminService methods for API keys, tenant limits and the audit log.

``AdminServicer`` (``admin_service.py``) routes CreateApiKey, ListApiKeys, RevokeApiKey,
GetTenant, ListTenants, UpdateTenantLimits and ListAuditEvents here. They need no leader
(keys, limits and the log are not dispatch state): any coordinator answers, so keys can
be revoked during an election. A key change is applied to this coordinator's cache at
once, and reaches the others through the directory's NOTIFY within a second.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import asyncpg
from google.protobuf import timestamp_pb2

from conveyor.coordinator import bounds, convert
from conveyor.coordinator.api import context, pages
from conveyor.coordinator.api.validation import (
    check_name,
    check_page_size,
    check_text,
    check_timestamp,
)
from conveyor.coordinator.audit.chain import Row
from conveyor.coordinator.errors import ApiKeyNotFound, FieldViolation, InvalidArgument
from conveyor.coordinator.store import api_keys as key_store
from conveyor.coordinator.store import audit as audit_store
from conveyor.coordinator.store import tenants as tenant_store
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.coordinator.tenancy.directory import Directory
from conveyor.coordinator.tenancy.quotas import Limits, Quotas
from conveyor.v1 import admin_service_pb2, auth_pb2

T = TypeVar("T")

MAX_DESCRIPTION_LENGTH = 1000
_KEY_ID = re.compile(r"[a-z2-7]{12}")


def api_key_message(row: Mapping[str, Any], now: datetime | None = None) -> auth_pb2.ApiKey:
    """A key row (without its hash) as the API shows it."""
    now = now or datetime.now(UTC)
    if row["revoke_time"] is not None:
        state = auth_pb2.API_KEY_STATE_REVOKED
    elif row["expire_time"] is not None and row["expire_time"] <= now:
        state = auth_pb2.API_KEY_STATE_EXPIRED
    else:
        state = auth_pb2.API_KEY_STATE_ACTIVE
    return auth_pb2.ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        # A scope written by hand (SQL) that this version does not know grants nothing.
        scopes=[api_keys.scope_value(s) for s in row["scopes"] if s in api_keys.ALL_SCOPES],
        description=row["description"],
        create_time=convert.timestamp(row["create_time"]),
        expire_time=convert.maybe_timestamp(row["expire_time"]),
        revoke_time=convert.maybe_timestamp(row["revoke_time"]),
        created_by=row["created_by"],
        state=state,
    )


def limits_message(values: Mapping[str, Any] | Limits | None) -> auth_pb2.TenantLimits:
    """Limits as the API shows them; from a row, unset (None) fields stay unset."""
    message = auth_pb2.TenantLimits()
    if values is None:
        return message
    items = (
        values.items()
        if isinstance(values, Mapping)
        else ((c, getattr(values, c)) for c in tenant_store.LIMIT_COLUMNS)
    )
    for name, value in items:
        if value is not None:
            setattr(message, name, value)
    return message


def audit_event_message(row: Row) -> auth_pb2.AuditEvent:
    e = row.event
    return auth_pb2.AuditEvent(
        seq=row.seq,
        time=convert.timestamp(e.time),
        tenant=e.tenant,
        key_id=e.key_id,
        action=e.action,
        target=e.target,
        outcome=e.outcome,
        peer=e.peer,
        request_id=e.request_id,
        detail=e.detail,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _raise(out: list[FieldViolation]) -> None:
    if out:
        raise InvalidArgument(out)


def validate_key_id(value: str, field: str = "id") -> str:
    if not _KEY_ID.fullmatch(value):
        raise InvalidArgument(
            [FieldViolation(field, "is not an API key id (12 characters, as keys list shows)")]
        )
    return value


def validate_scopes(values: Iterable[int], field: str, out: list[FieldViolation]) -> list[str]:
    names: list[str] = []
    for value in values:
        try:
            names.append(api_keys.scope_name(value))
        except ValueError:
            out.append(FieldViolation(field, f"{value} is not a scope"))
    if not names and not out:
        known = ", ".join(api_keys.ALL_SCOPES)
        out.append(FieldViolation(field, f"name at least one scope ({known})"))
    return list(api_keys.normalize_scopes(names))


async def create_key(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    scopes: Iterable[str],
    description: str,
    created_by: str,
    expire_time: datetime | None,
) -> tuple[asyncpg.Record, str]:
    """Inserts a new key (a fresh id on the rare collision); returns its row (hash
    included) and the whole key, which is shown once and never stored."""
    for _ in range(5):
        key_id, key = api_keys.generate()
        row = await key_store.insert(
            conn,
            key_id=key_id,
            secret_hash=api_keys.secret_hash(key),
            tenant=tenant,
            scopes=list(scopes),
            description=description,
            created_by=created_by,
            expire_time=expire_time,
        )
        if row is not None:
            return row, key
    raise RuntimeError("could not draw an unused API key id in 5 tries")  # 60 random bits


class SecurityAdmin:
    """See the module docstring."""

    def __init__(self, db: Database, directory: Directory, quotas: Quotas) -> None:
        self._db = db
        self._directory = directory
        self._quotas = quotas

    # -- keys ------------------------------------------------------------------------------

    async def create_api_key(
        self, request: admin_service_pb2.CreateApiKeyRequest
    ) -> admin_service_pb2.CreateApiKeyResponse:
        out: list[FieldViolation] = []
        check_name(request.tenant, "tenant", out, required=True)
        scopes = validate_scopes(request.scopes, "scopes", out)
        check_text(
            request.description, "description", out, max_length=MAX_DESCRIPTION_LENGTH,
            identifier=False,
        )  # fmt: skip
        expire_time = None
        if request.HasField("expire_time"):
            expire_time = check_timestamp(request.expire_time, "expire_time", out)
            if expire_time is not None and expire_time <= datetime.now(UTC):
                out.append(FieldViolation("expire_time", "must be in the future"))
        _raise(out)
        created_by = context.current().key_id or "insecure"
        async with self._db.autocommit() as conn:
            row, key = await create_key(
                conn,
                tenant=request.tenant,
                scopes=scopes,
                description=request.description,
                created_by=created_by,
                expire_time=expire_time,
            )
        self._directory.apply_keys([row])
        return admin_service_pb2.CreateApiKeyResponse(key=api_key_message(row), secret=key)

    async def list_api_keys(
        self, request: admin_service_pb2.ListApiKeysRequest
    ) -> admin_service_pb2.ListApiKeysResponse:
        def fetch(conn: asyncpg.Connection, after: Any, limit: int) -> Awaitable[list[Any]]:
            return key_store.list_page(
                conn,
                tenant=request.tenant or None,
                show_inactive=request.show_inactive,
                after=after,
                limit=limit,
            )

        rows, token = await self._listed(request, _key_page_token, fetch, _key_token)
        now = datetime.now(UTC)
        return admin_service_pb2.ListApiKeysResponse(
            keys=[api_key_message(r, now) for r in rows], next_page_token=token
        )

    async def revoke_api_key(
        self, request: admin_service_pb2.RevokeApiKeyRequest
    ) -> admin_service_pb2.RevokeApiKeyResponse:
        key_id = validate_key_id(request.id)
        async with self._db.autocommit() as conn:
            row = await key_store.revoke(conn, key_id)
        if row is None:
            raise ApiKeyNotFound(key_id)
        self._directory.apply_keys([row])
        return admin_service_pb2.RevokeApiKeyResponse(key=api_key_message(row))

    # -- tenants ---------------------------------------------------------------------------

    async def _tenants(self, names: Iterable[str] | None) -> list[auth_pb2.Tenant]:
        asked = None if names is None else list(names)
        async with self._db.read() as conn:
            rows = await (
                tenant_store.load_all(conn)
                if asked is None
                else tenant_store.load_names(conn, asked)
            )
            set_limits = {r["name"]: r for r in rows}
            backlog = await tenant_store.unfinished_per_tenant(conn, asked)
            schedules = await tenant_store.schedules_per_tenant(conn, asked)
            keys = await key_store.active_per_tenant(conn, asked)
        names = sorted(set(set_limits) | set(keys)) if asked is None else asked
        return [
            auth_pb2.Tenant(
                name=name,
                limits=limits_message(
                    {c: set_limits[name][c] for c in tenant_store.LIMIT_COLUMNS}
                    if name in set_limits
                    else None
                ),
                effective_limits=limits_message(self._quotas.limits(name)),
                usage=auth_pb2.TenantUsage(
                    backlog=backlog.get(name, 0),
                    schedules=schedules.get(name, 0),
                    active_keys=keys.get(name, 0),
                ),
            )
            for name in names
        ]

    async def get_tenant(
        self, request: admin_service_pb2.GetTenantRequest
    ) -> admin_service_pb2.GetTenantResponse:
        out: list[FieldViolation] = []
        check_name(request.name, "name", out, required=True)
        _raise(out)
        (tenant,) = await self._tenants([request.name])
        return admin_service_pb2.GetTenantResponse(tenant=tenant)

    async def list_tenants(
        self, request: admin_service_pb2.ListTenantsRequest
    ) -> admin_service_pb2.ListTenantsResponse:
        return admin_service_pb2.ListTenantsResponse(
            tenants=await self._tenants(None),
            default_limits=limits_message(self._quotas.defaults),
        )

    async def update_tenant_limits(
        self, request: admin_service_pb2.UpdateTenantLimitsRequest
    ) -> admin_service_pb2.UpdateTenantLimitsResponse:
        out: list[FieldViolation] = []
        check_name(request.tenant, "tenant", out, required=True)
        fields = list(request.update_mask.paths) or list(tenant_store.LIMIT_COLUMNS)
        values: dict[str, Any] = {}
        for name in fields:
            if name not in tenant_store.LIMIT_COLUMNS:
                known = ", ".join(tenant_store.LIMIT_COLUMNS)
                out.append(FieldViolation("update_mask", f"{name!r} is not a limit ({known})"))
                continue
            values[name] = _limit_value(request.limits, name, out)
        largest = self._quotas.defaults.max_payload_bytes
        if (values.get("max_payload_bytes") or 0) > largest:
            out.append(
                FieldViolation(
                    "limits.max_payload_bytes",
                    f"must be at most the coordinator's own max_payload_bytes, {largest}",
                )
            )
        _raise(out)
        async with self._db.autocommit() as conn:
            row = await tenant_store.set_limits(conn, request.tenant, values, fields)
        self._directory.apply_tenants([row])
        (tenant,) = await self._tenants([request.tenant])
        return admin_service_pb2.UpdateTenantLimitsResponse(tenant=tenant)

    # -- the audit log ---------------------------------------------------------------------

    async def list_audit_events(
        self, request: admin_service_pb2.ListAuditEventsRequest
    ) -> admin_service_pb2.ListAuditEventsResponse:
        def fetch(conn: asyncpg.Connection, after: Any, limit: int) -> Awaitable[list[Row]]:
            return audit_store.page(
                conn,
                tenant=request.tenant or None,
                newest_first=request.newest_first,
                after=after,
                limit=limit,
            )

        events, token = await self._listed(
            request, _audit_page_token, fetch, lambda last: str(last.seq)
        )
        return admin_service_pb2.ListAuditEventsResponse(
            events=[audit_event_message(r) for r in events], next_page_token=token
        )

    async def _listed(
        self,
        request: _PageRequest,
        parse_token: Callable[[str, list[FieldViolation]], Any],
        fetch: Callable[[asyncpg.Connection, Any, int], Awaitable[list[T]]],
        token: Callable[[T], str],
    ) -> tuple[list[T], str]:
        """One page of an admin list: the request checked (tenant filter, page size, the
        token's position), the rows read, and the next page's token."""
        out: list[FieldViolation] = []
        check_name(request.tenant, "tenant", out, required=False)
        size = check_page_size(request.page_size, out)
        after = parse_token(request.page_token, out)
        _raise(out)
        async with self._db.read() as conn:
            rows = await fetch(conn, after, pages.limit(size))
        return pages.page(rows, size, token)


class _PageRequest(Protocol):
    tenant: str
    page_size: int
    page_token: str


def _key_token(last: Mapping[str, Any]) -> str:
    return f"{convert.timestamp(last['create_time']).ToJsonString()}|{last['id']}"


def _limit_value(limits: auth_pb2.TenantLimits, name: str, out: list[FieldViolation]) -> Any:
    """A limit from the request: None (back to the default) when unset."""
    if not limits.HasField(name):  # type: ignore[arg-type]
        return None
    value = getattr(limits, name)
    problem = bounds.limit_problem(name, value)
    if problem is not None:
        out.append(FieldViolation(f"limits.{name}", problem))
    return float(value) if name == "submit_rate" else int(value)


def _audit_page_token(token: str, out: list[FieldViolation]) -> int | None:
    """The audit row sequence number a ListAuditEvents page token names (a bigint)."""
    if not token:
        return None
    if token.isascii() and token.isdigit() and 0 < int(token) < 2**63:
        return int(token)
    out.append(FieldViolation("page_token", "is not a token this list gave"))
    return None


def _key_page_token(token: str, out: list[FieldViolation]) -> tuple[datetime, str] | None:
    if not token:
        return None
    when, _, key_id = token.partition("|")
    try:
        if not _KEY_ID.fullmatch(key_id):
            raise ValueError(key_id)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(when)
        return stamp.ToDatetime(tzinfo=UTC), key_id
    except ValueError:
        out.append(FieldViolation("page_token", "is not a token this list gave"))
        return None
