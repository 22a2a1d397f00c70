"""The connected workers as the API shows them: ``AdminService.GetClusterStatus`` and
``DrainWorker`` (every tenant's) and ``TaskService.ListWorkers`` (the caller's tenant's,
or every tenant's for an admin key), from the leader's session registry and, for the
tasks each holds, the store."""

from __future__ import annotations

import logging

from conveyor.coordinator import convert
from conveyor.coordinator.dispatch.sessions import SessionRegistry, WorkerSession
from conveyor.coordinator.errors import is_store_error
from conveyor.coordinator.store import tasks as store
from conveyor.coordinator.store.db import Database
from conveyor.v1 import admin_service_pb2, worker_service_pb2

__all__ = ["in_flight", "worker_info", "worker_infos"]

_log = logging.getLogger("conveyor.coordinator.admin")


async def in_flight(db: Database, worker_ids: list[str]) -> dict[tuple[str, str], int]:
    """Leases held per (tenant, worker id), from the database (a listing still answers
    without them)."""
    if not worker_ids:
        return {}
    try:
        async with db.read() as conn:
            return await store.running_per_worker(conn, worker_ids)
    except Exception as exc:
        if not is_store_error(exc):
            raise
        _log.warning("worker listing without in-flight counts: %s", exc)
        return {}


def worker_info(
    s: WorkerSession, in_flight: dict[tuple[str, str], int]
) -> admin_service_pb2.WorkerInfo:
    """A connected worker as the API shows it (``in_flight``: leases per (tenant, worker
    id))."""
    return admin_service_pb2.WorkerInfo(
        worker_id=s.worker_id,
        tenant=s.tenant,
        hostname=s.hostname,
        pid=s.pid,
        queues=s.queues,
        task_types=s.task_types,
        credit=s.credit,
        draining=s.draining,
        connect_time=convert.timestamp_from_seconds(s.connect_time),
        in_flight=in_flight.get((s.tenant, s.worker_id), 0),
        loop_lag=convert.duration_ms(round(s.loop_lag * 1000)),
        unhealthy=s.unhealthy,
        encryption_keys=None
        if s.encryption_keys is None
        else worker_service_pb2.EncryptionKeys(key_ids=sorted(s.encryption_keys)),
    )


async def worker_infos(
    sessions: SessionRegistry, db: Database, tenant: str | None = None
) -> list[admin_service_pb2.WorkerInfo]:
    """The live sessions as WorkerInfo: ``tenant``'s only, or every tenant's (None)."""
    chosen = [s for s in sessions if tenant is None or s.tenant == tenant]
    held = await in_flight(db, [s.worker_id for s in chosen])
    return [worker_info(s, held) for s in chosen]
