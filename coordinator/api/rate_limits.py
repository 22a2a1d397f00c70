"""The rate-limit methods of ``TaskService`` (SetRateLimit, ListRateLimits,
DeleteRateLimit) and the limits ``ListQueues`` shows per queue.

A tenant sets and sees its own limits; a limit across all tenants (``all_tenants``) is
set and deleted only with the admin scope (or with authentication off), and every tenant
sees those that apply to it. The leader serves these methods, so a change reaches its
buckets at once (:meth:`RateLimits.invalidate`); the buckets themselves are the
dispatcher's (``dispatch/rate_limits.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import asyncpg

from conveyor.coordinator import bounds
from conveyor.coordinator.api import context
from conveyor.coordinator.api.validation import check_name
from conveyor.coordinator.dispatch.rate_limits import RateLimits
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    RateLimitNotFound,
)
from conveyor.coordinator.store import rate_limits as store
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.store.rate_limits import ALL_TENANTS
from conveyor.coordinator.tenancy.keys import ADMIN
from conveyor.v1 import task_pb2, task_service_pb2


def to_proto(row: asyncpg.Record) -> task_pb2.RateLimit:
    return task_pb2.RateLimit(
        queue=row["queue"],
        type=row["type"],
        rate=row["rate"],
        burst=row["burst"],
        all_tenants=row["tenant"] == ALL_TENANTS,
        tokens=row["tokens"],
    )


def of_queue(limits: Iterable[task_pb2.RateLimit], queue: str) -> list[task_pb2.RateLimit]:
    """The limits that cover ``queue`` (its own and those of every queue)."""
    return [limit for limit in limits if limit.queue in ("", queue)]


class RateLimitService:
    def __init__(self, db: Database, limits: RateLimits, *, authentication: bool) -> None:
        self._db = db
        self._limits = limits
        self._authentication = authentication

    def _owner(self, all_tenants: bool, method: str) -> str:
        """The ``tenant`` column a request names: the caller's, or every tenant's for an
        admin."""
        call = context.current()
        if not all_tenants:
            return call.tenant
        if self._authentication and ADMIN not in call.scopes:
            raise PermissionDenied(call.key_id, ADMIN, method)
        return ALL_TENANTS

    async def set_limit(
        self, request: task_service_pb2.SetRateLimitRequest
    ) -> task_service_pb2.SetRateLimitResponse:
        limit = request.limit
        out: list[FieldViolation] = []
        check_name(limit.queue, "limit.queue", out, required=False)
        check_name(limit.type, "limit.type", out, required=False)
        problem = bounds.rate_problem(limit.rate)
        if problem is None and limit.rate == 0:
            problem = "must be above 0 (DeleteRateLimit lifts a limit)"
        if problem is not None:
            out.append(FieldViolation("limit.rate", problem))
        burst_problem = bounds.count_problem(limit.burst)
        if burst_problem is not None:
            out.append(FieldViolation("limit.burst", burst_problem))
        if out:
            raise InvalidArgument(out)
        # 0: one second's worth, at least one token (a bucket below one never gives one).
        burst = limit.burst or max(1, math.ceil(limit.rate))
        tenant = self._owner(limit.all_tenants, "SetRateLimit")
        async with self._db.autocommit() as conn:
            row = await store.upsert(conn, tenant, limit.queue, limit.type, limit.rate, burst)
        self._limits.invalidate()
        return task_service_pb2.SetRateLimitResponse(limit=to_proto(row))

    async def list_limits(self) -> task_service_pb2.ListRateLimitsResponse:
        return task_service_pb2.ListRateLimitsResponse(limits=await self.of_tenant())

    async def of_tenant(self) -> list[task_pb2.RateLimit]:
        """The limits that apply to the caller's tenant: its own, then all tenants'."""
        async with self._db.read() as conn:
            rows = await store.of_tenant(conn, context.current().tenant)
        return [to_proto(r) for r in rows]

    async def delete_limit(
        self, request: task_service_pb2.DeleteRateLimitRequest
    ) -> task_service_pb2.DeleteRateLimitResponse:
        out: list[FieldViolation] = []
        check_name(request.queue, "queue", out, required=False)
        check_name(request.type, "type", out, required=False)
        if out:
            raise InvalidArgument(out)
        tenant = self._owner(request.all_tenants, "DeleteRateLimit")
        async with self._db.autocommit() as conn:
            found = await store.delete(conn, tenant, request.queue, request.type)
        if not found:
            raise RateLimitNotFound(request.queue, request.type)
        self._limits.invalidate()
        return task_service_pb2.DeleteRateLimitResponse()
