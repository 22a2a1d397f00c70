"""Leader-only routing: a follower refuses the calls only the leader may serve.

The refusal is UNAVAILABLE with ``ErrorInfo`` reason NOT_LEADER and the leader's address
(empty while there is none), which the client and the worker SDK follow. Which methods any
coordinator may serve is this module's one table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc.aio

from conveyor.coordinator.api.interceptors.base import Behavior, BehaviorInterceptor
from conveyor.coordinator.errors import NotLeader

ANY_COORDINATOR = frozenset(
    {
        "/conveyor.v1.AdminService/GetClusterStatus",
        # Keys, limits and the audit log are not dispatch state: revoking a key must work
        # during an election too.
        "/conveyor.v1.AdminService/CreateApiKey",
        "/conveyor.v1.AdminService/ListApiKeys",
        "/conveyor.v1.AdminService/RevokeApiKey",
        "/conveyor.v1.AdminService/GetTenant",
        "/conveyor.v1.AdminService/ListTenants",
        "/conveyor.v1.AdminService/UpdateTenantLimits",
        "/conveyor.v1.AdminService/ListAuditEvents",
        # The ledger is fenced by the task row and locks live in PostgreSQL: neither is
        # dispatch state, so effects stay recordable during an election.
        "/conveyor.v1.LedgerService/RecordEffect",
        "/conveyor.v1.LedgerService/GetEffect",
        "/conveyor.v1.LockService/AcquireLock",
        "/conveyor.v1.LockService/RenewLock",
        "/conveyor.v1.LockService/ReleaseLock",
        # Its changes reach every coordinator (lifecycle/task_events.py).
        "/conveyor.v1.TaskService/WatchTasks",
        # Submits and reads: PostgreSQL is the truth, and a new task's insert needs no
        # fence (only dispatch-side writes do: claims, leases, results, reaping). A
        # follower inserts, then wakes the leader's dispatcher (lifecycle/work_ready.py),
        # so submits keep working through an election and spread over the replicas.
        "/conveyor.v1.TaskService/SubmitTask",
        "/conveyor.v1.TaskService/SubmitTasks",
        "/conveyor.v1.TaskService/GetTask",
        "/conveyor.v1.TaskService/ListTasks",
        "/conveyor.v1.TaskService/WatchTask",
        "/conveyor.v1.TaskService/GetSchedule",
        "/conveyor.v1.TaskService/ListSchedules",
        # Definitions are not dispatch state; a change reaches every coordinator's cache.
        "/conveyor.v1.TaskTypeService/SetTaskType",
        "/conveyor.v1.TaskTypeService/GetTaskType",
        "/conveyor.v1.TaskTypeService/ListTaskTypes",
        "/conveyor.v1.TaskTypeService/DeleteTaskType",
    }
)
"""Methods every coordinator answers; every other conveyor.v1 method is the leader's."""


class LeaderInterceptor(BehaviorInterceptor):
    def __init__(self, is_leader: Callable[[], bool], leader_address: Callable[[], str]) -> None:
        super().__init__()
        self._is_leader = is_leader
        self._leader_address = leader_address

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        if method in ANY_COORDINATOR:
            return behavior
        is_leader, leader_address = self._is_leader, self._leader_address

        async def leader_only(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not is_leader():
                raise NotLeader(leader_address())
            return await behavior(request, context)

        return leader_only
