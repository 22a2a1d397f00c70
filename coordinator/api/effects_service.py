"""``LedgerService`` and ``LockService``: what handlers and applications use to make their
effects exactly once (issue 18).

- The ledger (``store/effects.py``): an attempt records "this effect happened, with this
  result" under a key, fenced by its task's lease in the same statement; a later attempt
  reads it back and skips the effect. The lease is named by the wire ``Lease`` (task id,
  attempt, epoch) and proven by the worker process's resume token, whose SHA-256 the lease
  row records (``lease_holder``): a worker id or a task id proves nothing.
- Named locks (``store/locks.py``): per tenant, each acquisition with a fencing token
  larger than every earlier one of the name. Backed by PostgreSQL on every coordinator,
  with or without etcd: every coordinator has the database, the token and the holder
  change in one statement, and one source of tokens per name keeps them comparable (an
  etcd backend would number a name's tokens apart from the ones PostgreSQL gave before).

Neither is dispatch state: every coordinator serves them (``interceptors/leader.py``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2

from conveyor.coordinator import convert
from conveyor.coordinator.api import context
from conveyor.coordinator.api.validation import (
    RESUME_TOKEN_BYTES,
    check_text,
    validate_task_id,
)
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    LeaseNotHeld,
    LockNotHeld,
    TaskNotFound,
)
from conveyor.coordinator.ids import parse_task_id
from conveyor.coordinator.lifecycle.leases import lease_holder
from conveyor.coordinator.store import effects as ledger_store
from conveyor.coordinator.store import locks as lock_store
from conveyor.v1 import effects_service_pb2 as pb
from conveyor.v1 import effects_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

MAX_KEY_LENGTH = 200
"""The longest ledger key and lock name."""
MAX_RESULT_BYTES = 64 << 10
"""The largest result one ledger entry keeps: a record of an effect, not a payload."""
MIN_LOCK_TTL = timedelta(milliseconds=100)
MAX_LOCK_TTL = timedelta(hours=1)
HANDLE_BYTES = 16


def _check_key(value: str, field: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(field, "must not be empty"))
    else:
        check_text(value, field, out, max_length=MAX_KEY_LENGTH)


def _raise(out: Sequence[FieldViolation]) -> None:
    if out:
        raise InvalidArgument(out)


def _entry(row: Any) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        task_id=row["task_id"],
        key=row["key"],
        result=row["result"],
        attempt=row["attempt"],
        fencing_token=row["fencing_token"],
        create_time=convert.timestamp(row["create_time"]),
    )


class LedgerServicer(pb_grpc.LedgerServiceServicer):
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def RecordEffect(
        self, request: pb.RecordEffectRequest, context_: Context
    ) -> pb.RecordEffectResponse:
        out: list[FieldViolation] = []
        lease = request.lease
        task_id = parse_task_id(lease.task_id) if lease.task_id else None
        if task_id is None:
            out.append(FieldViolation("lease.task_id", "must be a task id (a UUID)"))
        if lease.attempt < 1:
            out.append(FieldViolation("lease.attempt", "must be at least 1"))
        if lease.epoch < 1:
            out.append(FieldViolation("lease.epoch", "must be at least 1"))
        if len(request.resume_token) != RESUME_TOKEN_BYTES:
            out.append(
                FieldViolation(
                    "resume_token",
                    f"must be the {RESUME_TOKEN_BYTES}-byte token of the worker's last Welcome",
                )
            )
        _check_key(request.key, "key", out)
        if len(request.result) > MAX_RESULT_BYTES:
            out.append(FieldViolation("result", f"must be at most {MAX_RESULT_BYTES} bytes"))
        _raise(out)
        assert task_id is not None
        tenant = context.current().tenant
        async with self._deps.db.write() as conn:
            recorded = await ledger_store.record(
                conn,
                tenant=tenant,
                task_id=task_id,
                attempt=lease.attempt,
                epoch=lease.epoch,
                holder=lease_holder(request.resume_token),
                key=request.key,
                result=request.result,
            )
            exists = (
                recorded is not None
                or await ledger_store.get(conn, tenant, task_id, request.key) is not None
            )
        if not exists:
            raise TaskNotFound(lease.task_id)
        if recorded is None:
            raise LeaseNotHeld(lease.task_id)
        row, new = recorded
        return pb.RecordEffectResponse(entry=_entry(row), recorded=new)

    async def GetEffect(
        self, request: pb.GetEffectRequest, context_: Context
    ) -> pb.GetEffectResponse:
        out: list[FieldViolation] = []
        _check_key(request.key, "key", out)
        _raise(out)
        task_id = validate_task_id(request.task_id, "task_id")
        async with self._deps.db.read() as conn:
            row = await ledger_store.get(conn, context.current().tenant, task_id, request.key)
        if row is None:
            raise TaskNotFound(request.task_id)
        return pb.GetEffectResponse(entry=None if row["task_id"] is None else _entry(row))


def _ttl_seconds(value: duration_pb2.Duration | None, out: list[FieldViolation]) -> float:
    if value is None:
        out.append(FieldViolation("ttl", "must be set"))
        return 0.0
    if not -999_999_999 <= value.nanos <= 999_999_999:
        out.append(FieldViolation("ttl", "is not a valid duration"))
        return 0.0
    ttl = value.seconds + value.nanos / 1e9
    if not MIN_LOCK_TTL.total_seconds() <= ttl <= MAX_LOCK_TTL.total_seconds():
        out.append(FieldViolation("ttl", f"must be between {MIN_LOCK_TTL} and {MAX_LOCK_TTL}"))
    return ttl


def _check_handle(handle: bytes, out: list[FieldViolation]) -> None:
    if len(handle) != HANDLE_BYTES:
        out.append(FieldViolation("handle", "must be the handle AcquireLock returned"))


class LockServicer(pb_grpc.LockServiceServicer):
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def AcquireLock(
        self, request: pb.AcquireLockRequest, context_: Context
    ) -> pb.AcquireLockResponse:
        out: list[FieldViolation] = []
        _check_key(request.name, "name", out)
        ttl = _ttl_seconds(request.ttl if request.HasField("ttl") else None, out)
        _raise(out)
        tenant = context.current().tenant
        handle = secrets.token_bytes(HANDLE_BYTES)
        async with self._deps.db.write() as conn:
            taken = await lock_store.acquire(conn, tenant, request.name, handle, ttl)
            left = (
                0.0 if taken is not None else await lock_store.time_left(conn, tenant, request.name)
            )
        if taken is None:
            wait = duration_pb2.Duration()
            wait.FromTimedelta(timedelta(seconds=left))
            return pb.AcquireLockResponse(acquired=False, retry_after=wait)
        token, expire = taken
        return pb.AcquireLockResponse(
            acquired=True,
            fencing_token=token,
            handle=handle,
            expire_time=convert.timestamp(expire),
        )

    async def RenewLock(
        self, request: pb.RenewLockRequest, context_: Context
    ) -> pb.RenewLockResponse:
        out: list[FieldViolation] = []
        _check_key(request.name, "name", out)
        _check_handle(request.handle, out)
        ttl = _ttl_seconds(request.ttl if request.HasField("ttl") else None, out)
        _raise(out)
        async with self._deps.db.write() as conn:
            expire = await lock_store.renew(
                conn, context.current().tenant, request.name, request.handle, ttl
            )
        if expire is None:
            raise LockNotHeld(request.name)
        return pb.RenewLockResponse(expire_time=convert.timestamp(expire))

    async def ReleaseLock(
        self, request: pb.ReleaseLockRequest, context_: Context
    ) -> pb.ReleaseLockResponse:
        out: list[FieldViolation] = []
        _check_key(request.name, "name", out)
        _check_handle(request.handle, out)
        _raise(out)
        async with self._deps.db.write() as conn:
            released = await lock_store.release(
                conn, context.current().tenant, request.name, request.handle
            )
        return pb.ReleaseLockResponse(released=released)
