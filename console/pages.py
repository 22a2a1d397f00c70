"""The operator's pages: queues, tasks and a task, dead letters, schedules, workers.

Every page reads with the signed-in user's own client (their key: their tenant, their
scopes) and fetches one page of rows at most: lists go by the API's keyset page tokens
(``?page_token=`` is the API's ``next_page_token``), never by reading a table whole.
Actions (cancel, retry, pause, resume) are POSTs that carry the session's CSRF token and
answer with a redirect back to the page, whose flash message says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from conveyor.client import (
    AsyncClient,
    Page,
    PermissionDeniedError,
    Task,
    TaskState,
    WorkerInfo,
)
from conveyor.client._models import parse_state_name
from conveyor.console import admin
from conveyor.console.present import made_by_schedule
from conveyor.console.web import (
    STATE,
    ConsoleSession,
    action,
    page,
    query_path,
    redirect,
    render,
)
from conveyor.v1 import admin_service_pb2

__all__ = ["routes", "schedule_url", "task_url"]

#: The states the task filter offers, in lifecycle order.
STATES = [s for s in TaskState if s is not TaskState.UNSPECIFIED]
#: Dead tasks retried at once by one "retry selected" (one RetryTask each, a few at a time).
MAX_RETRY_SELECTION = 200
#: RetryTasks calls one group's button makes at most (each redrives up to 10,000).
_GROUP_ROUNDS = 10
#: Schedule pages read to find a schedule by its id (a task knows only the id).
_FIND_SCHEDULE_PAGES = 10


def task_url(task_id: str) -> str:
    return "/tasks/" + task_id


def schedule_url(name: str) -> str:
    # Schedule names may hold "/": a query parameter, not a path segment.
    return "/schedule?" + urlencode({"name": name})


async def index(request: web.Request) -> web.StreamResponse:
    raise redirect("/queues")


@page
async def queues(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    stats = await session.client.queues()
    return render(request, "queues.html", session, queues=stats)


def _text(request: web.Request, name: str) -> str:
    return request.query.get(name, "").strip()


@page
async def tasks(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    state_name = _text(request, "state")
    state = parse_state_name(state_name) if state_name else None
    if state_name and state in (None, TaskState.UNSPECIFIED):
        return _not_understood(request, session, f"There is no task state {state_name!r}.")
    try:
        _, context = await _task_page(request, session, state)
    except BadFilter as exc:
        return _not_understood(request, session, str(exc))
    context["filters"]["state"] = state.name if state else ""
    return render(request, "tasks.html", session, states=STATES, **context)


async def _task_page(
    request: web.Request, session: ConsoleSession, state: TaskState | None
) -> tuple[Page[Task], dict[str, Any]]:
    """One page of tasks as the query asks (queue, type, page token), and what the
    templates show of it."""
    queue, type_ = _text(request, "queue"), _text(request, "type")
    label, after, before = (
        _text(request, "label"),
        _text(request, "after"),
        _text(request, "before"),
    )
    token = _text(request, "page_token")
    key, _, value = label.partition("=")
    rows = await session.client.list(
        queue or None,
        state,
        type_ or None,
        page_size=request.app[STATE].page_size,
        page_token=token or None,
        labels={key.strip(): value.strip()} if key.strip() else None,
        created_after=_utc(after, "after"),
        created_before=_utc(before, "before"),
    )
    return rows, {
        "tasks": rows.items,
        "next_token": rows.next_page_token,
        "paged": bool(token),
        "filters": {
            "queue": queue,
            "type": type_,
            "label": label,
            "after": after,
            "before": before,
        },
    }


def _not_understood(request: web.Request, session: ConsoleSession, message: str) -> web.Response:
    return render(
        request, "error.html", session, status=400, title="Not understood", message=message
    )


class BadFilter(ValueError):
    """A list filter of the query string that cannot be read (the page says so, 400)."""


def _utc(text: str, name: str) -> datetime | None:
    """A time filter as the form sends it (``2026-12-07T06:10``, read as UTC)."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(f"{name}: {text!r} is not a time such as 2026-12-07T06:10 (UTC)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@page
async def task(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    found, attempts = await session.client.get_with_attempts(request.match_info["id"])
    return render(
        request,
        "task.html",
        session,
        task=found,
        attempts=attempts,
        made_by=made_by_schedule(found.idempotency_key),
    )


@action
async def cancel(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    task_id = request.match_info["id"]
    done = await session.client.cancel(task_id)
    session.flash(f"Task {task_id} is {done.state.name}.")
    raise redirect(task_url(task_id))


@action
async def retry(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    task_id = request.match_info["id"]
    done = await session.client.retry(task_id)
    session.flash(f"Task {task_id} redriven: it is {done.state.name} with fresh attempts.")
    raise redirect(task_url(task_id))


@page
async def dead(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    try:
        _, context = await _task_page(request, session, TaskState.DEAD)
    except BadFilter as exc:
        return _not_understood(request, session, str(exc))
    # Every dead task of the tenant, grouped by the coordinator (ListDeadTaskGroups).
    groups = await session.client.dead_groups(
        queue=context["filters"]["queue"] or None, type=context["filters"]["type"] or None
    )
    return render(request, "dead.html", session, groups=groups, **context)


@action
async def retry_selected(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """Redrives the dead tasks ticked on the page, in one RetryTasks call."""
    form = await request.post()
    ids = list(dict.fromkeys(str(v) for v in form.getall("task", [])))
    if not ids:
        session.flash("No task was selected.", error=True)
        raise redirect("/dead")
    if len(ids) > MAX_RETRY_SELECTION:
        session.flash(f"At most {MAX_RETRY_SELECTION} tasks at once.", error=True)
        raise redirect("/dead")
    done = await session.client.retry_tasks(ids)
    left = len(done.skipped_ids) + len(done.not_found_ids)
    session.flash(f"Redrove {done.count} of {len(ids)} dead task(s).", error=bool(left))
    if left:
        named = " ".join((*done.skipped_ids, *done.not_found_ids)[:5])
        session.flash(f"{left} were no longer dead (or gone): {named}", error=True)
    raise redirect("/dead")


@action
async def retry_group(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """Redrives every dead task of one group (type and error fingerprint, in the page's
    queue if it filters by one), in RetryTasks calls of up to 10,000 each."""
    form = await request.post()
    type_, fingerprint = str(form.get("type", "")), str(form.get("fingerprint", ""))
    queue = str(form.get("queue", "")) or None
    if not type_ or not fingerprint:
        # An empty fingerprint filters nothing: it would redrive the whole type.
        session.flash("That group cannot be retried at once: tick its tasks.", error=True)
        raise redirect("/dead")
    total, more = 0, True
    for _ in range(_GROUP_ROUNDS):
        done = await session.client.retry_tasks(type=type_, fingerprint=fingerprint, queue=queue)
        total, more = total + done.count, done.more
        if not more:
            break
    tail = " (more remain: retry the group again)" if more else ""
    session.flash(f"Redrove {total} dead task(s) of {type_}: {fingerprint}{tail}.")
    raise redirect(query_path("/dead", queue=queue))


@page
async def schedules(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    token = _text(request, "page_token")
    rows = await session.client.list_schedules(
        page_size=request.app[STATE].page_size, page_token=token or None
    )
    return render(
        request,
        "schedules.html",
        session,
        schedules=rows.items,
        next_token=rows.next_page_token,
        paged=bool(token),
    )


@page
async def schedule(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    found = await session.client.get_schedule(_text(request, "name"))
    return render(request, "schedule.html", session, schedule=found)


@page
async def schedule_by_id(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """Finds a schedule by its id (what a fired task's idempotency key names), reading at
    most a few pages of schedules: the API looks schedules up by name only."""
    wanted = request.match_info["id"]
    token: str | None = None
    for _ in range(_FIND_SCHEDULE_PAGES):
        rows = await session.client.list_schedules(page_size=1000, page_token=token)
        for item in rows.items:
            if item.id == wanted:
                raise redirect(schedule_url(item.name))
        token = rows.next_page_token
        if token is None:
            break
    return render(
        request,
        "error.html",
        session,
        status=404,
        title="Not found",
        message=f"No schedule has the id {wanted}: it may have been deleted since.",
    )


async def _pause_or_resume(
    request: web.Request, session: ConsoleSession, *, pause: bool
) -> web.StreamResponse:
    form = await request.post()
    name = str(form.get("name", ""))
    client = session.client
    done = await (client.pause_schedule(name) if pause else client.resume_schedule(name))
    session.flash(f"Schedule {name} is {'paused' if done.paused else 'active'}.")
    back = str(form.get("back", ""))
    raise redirect("/schedules" if back == "/schedules" else schedule_url(name))


@action
async def pause_schedule(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    return await _pause_or_resume(request, session, pause=True)


@action
async def resume_schedule(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    return await _pause_or_resume(request, session, pause=False)


@dataclass(frozen=True)
class WorkersView:
    """What the workers page shows: the key's workers (every tenant's for an admin key),
    and for an admin key the cluster (leader, epoch, evictions) too."""

    workers: list[WorkerInfo] | None
    cluster: admin_service_pb2.GetClusterStatusResponse | None


async def workers_view(client: AsyncClient, session: ConsoleSession) -> WorkersView:
    """Reads the workers page (a scope the key lacks is remembered, not asked again)."""
    cluster = None
    if "admin" not in session.denied:
        try:
            cluster = await admin.cluster_status(client)
        except PermissionDeniedError:
            session.denied.add("admin")
    listed = None
    if "read" not in session.denied:
        try:
            listed = await client.workers()
        except PermissionDeniedError:
            session.denied.add("read")
    return WorkersView(listed, cluster)


@page
async def workers(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    view = await workers_view(session.client, session)
    return render(request, "workers.html", session, workers=view.workers, cluster=view.cluster)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", index),
        web.get("/queues", queues),
        web.get("/tasks", tasks),
        web.get("/tasks/{id}", task),
        web.post("/tasks/{id}/cancel", cancel),
        web.post("/tasks/{id}/retry", retry),
        web.get("/dead", dead),
        web.post("/dead/retry", retry_selected),
        web.post("/dead/retry-group", retry_group),
        web.get("/schedules", schedules),
        web.get("/schedule", schedule),
        web.get("/schedules/by-id/{id}", schedule_by_id),
        web.post("/schedule/pause", pause_schedule),
        web.post("/schedule/resume", resume_schedule),
        web.get("/workers", workers),
    ]
