"""The audit interceptor: every key, schedule, cancel, retry, pause and admin call, with its
outcome, into the audit log (``audit/appender.py``).

:data:`AUDITED` is the one table of audited methods and what each acts on (its target).
The event is recorded after the call ran, whatever its outcome ("OK", or the error
reason), and a call that changes something waits for it to commit before answering
(bounded, see ``audit.APPEND_WAIT``); admin reads (:data:`READS`) do not wait. Reads of
tasks and schedules, cluster status, submits and the worker stream are not audited: they
are the hot path or polled, and tasks record their own history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc.aio

from conveyor.coordinator.api import context as request_context
from conveyor.coordinator.api.interceptors.base import Behavior, BehaviorInterceptor
from conveyor.coordinator.audit.appender import AuditLog
from conveyor.coordinator.audit.chain import Event
from conveyor.coordinator.errors import domain_error, reason_name

Target = Callable[[Any, Any], str]
"""What a call acts on, from its request and (None when it failed) its response."""


def _id(request: Any, response: Any) -> str:
    return str(request.id)


def _name(request: Any, response: Any) -> str:
    return str(request.name)


def _schedule_name(request: Any, response: Any) -> str:
    return str(request.schedule.name)


def _new_key(request: Any, response: Any) -> str:
    key_id = response.key.id if response is not None else ""
    return f"{request.tenant}/{key_id}" if key_id else str(request.tenant)


def _revoked_key(request: Any, response: Any) -> str:
    return f"{response.key.tenant}/{request.id}" if response is not None else str(request.id)


def _tenant(request: Any, response: Any) -> str:
    return str(request.tenant)


def _nothing(request: Any, response: Any) -> str:
    return ""


_TASKS = "/conveyor.v1.TaskService/"
_ADMIN = "/conveyor.v1.AdminService/"

AUDITED: dict[str, Target] = {
    _TASKS + "CancelTask": _id,
    _TASKS + "RetryTask": _id,
    _TASKS + "CreateSchedule": _schedule_name,
    _TASKS + "UpdateSchedule": _schedule_name,
    _TASKS + "DeleteSchedule": _name,
    _TASKS + "PauseSchedule": _name,
    _TASKS + "ResumeSchedule": _name,
    _ADMIN + "CreateApiKey": _new_key,
    _ADMIN + "ListApiKeys": _tenant,
    _ADMIN + "RevokeApiKey": _revoked_key,
    _ADMIN + "GetTenant": _name,
    _ADMIN + "ListTenants": _nothing,
    _ADMIN + "UpdateTenantLimits": _tenant,
    _ADMIN + "ListAuditEvents": _tenant,
}
# Reads are recorded too (who looked at keys, tenants and the log), but their answers do
# not wait for the row to commit: a read's speed should not depend on the chain's writes.
# Cluster status is not audited at all: `conveyor top` polls it every second.
READS = frozenset(
    _ADMIN + m for m in ("ListApiKeys", "GetTenant", "ListTenants", "ListAuditEvents")
)


def outcome_of(exc: BaseException) -> str:
    """What an audit row says of a call that raised: its error reason, or what it was."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED_BY_HANDLER"
    error = domain_error(exc)
    return "INTERNAL" if error is None else reason_name(error.reason)


class AuditInterceptor(BehaviorInterceptor):
    def __init__(self, log: AuditLog) -> None:
        super().__init__()
        self._log = log

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        target_of = AUDITED.get(method)
        if target_of is None:
            return behavior
        action = method.rsplit("/", 1)[-1]
        log = self._log
        wait = method not in READS

        def event(request: Any, response: Any, outcome: str) -> Event:
            call = request_context.current()
            try:
                target = target_of(request, response)
            except AttributeError:  # an undecodable request has no fields
                target = ""
            return Event.make(
                tenant=call.tenant,
                key_id=call.key_id,
                action=action,
                target=target,
                outcome=outcome,
                peer=call.peer,
                request_id=call.request_id,
            )

        async def audited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                response = await behavior(request, context)
            except asyncio.CancelledError as exc:
                log.record(event(request, None, outcome_of(exc)), wait=False)
                raise
            except Exception as exc:
                await _record(event(request, None, outcome_of(exc)))
                raise
            await _record(event(request, response, "OK"))
            return response

        async def _record(entry: Event) -> None:
            if wait:
                await log.append(entry)
            else:
                log.record(entry, wait=False)

        return audited
