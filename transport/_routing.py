"""Which coordinator may answer which call: the one table the coordinator's leader
interceptor enforces and the client routes by.

Only dispatch needs the leader (claims, leases, results, reaping, cron firing, the worker
stream) and what lives only in its memory (the connected workers). Everything PostgreSQL
alone answers, and a new task's insert (it needs no fence), any coordinator serves.
"""

from __future__ import annotations

__all__ = ["ANY_COORDINATOR", "SPREAD"]

_TASKS = "/conveyor.v1.TaskService/"
_WEBHOOKS = "/conveyor.v1.WebhookService/"

SPREAD = frozenset(
    {
        # Submits: PostgreSQL is the truth, and a new task's insert needs no fence (only
        # dispatch-side writes do). A follower inserts, then wakes the leader's
        # dispatcher (coordinator/lifecycle/work_ready.py).
        _TASKS + "SubmitTask",
        _TASKS + "SubmitTasks",
        # Reads of what PostgreSQL holds, with no cache between: the same answer from
        # every coordinator.
        _TASKS + "GetTask",
        _TASKS + "ListTasks",
        _TASKS + "WatchTask",
        _TASKS + "GetSchedule",
        _TASKS + "ListSchedules",
        # Without with_workers (the leader's memory) a follower answers from PostgreSQL;
        # with it, a follower refuses with NOT_LEADER in the handler.
        _TASKS + "ListQueues",
        # The limits' rows; their tokens are the level the leader last wrote back.
        _TASKS + "ListRateLimits",
        _TASKS + "ListDeadTasks",
        _TASKS + "ListDeadTaskGroups",
        _WEBHOOKS + "ListWebhooks",
        _WEBHOOKS + "ListWebhookDeliveries",
    }
)
"""Submits and reads any coordinator answers alike: a client that knows several
coordinators spreads these over them (client/_channel.py)."""

ANY_COORDINATOR = SPREAD | frozenset(
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
        _TASKS + "WatchTasks",
        # Definitions are not dispatch state; a change reaches every coordinator's cache.
        "/conveyor.v1.TaskTypeService/SetTaskType",
        "/conveyor.v1.TaskTypeService/GetTaskType",
        "/conveyor.v1.TaskTypeService/ListTaskTypes",
        "/conveyor.v1.TaskTypeService/DeleteTaskType",
    }
)
"""Methods every coordinator answers; every other conveyor.v1 method is the leader's
(ListWorkers: the workers are its memory; CancelTask, RetryTask(s), UpdateTask,
DeleteTasks, Pause/ResumeQueue, rate-limit and schedule writes: they change dispatch
state or its caches; WorkerService.Connect). The client keeps these on the address that
answered last rather than spreading them: keys, task types and locks are calls a program
makes in sequence and reads back, and a long-lived WatchTasks stream is opened once."""
