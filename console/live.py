"""Live updates: server-sent events that carry rendered HTML fragments.

A page that updates by itself holds an ``EventSource`` (htmx's SSE extension) on one of
these streams; each event's data is a fragment rendered with the same template (and the
same autoescaping) as the page's first render, which htmx swaps in:

- ``/live/tasks/{id}``: the task's state, attempts and result, from ``WatchTask`` (the
  coordinator pushes each change); when the task is finished the stream sends ``end``,
  on which the page closes it.
- ``/live/queues`` and ``/live/workers``: the page's table, re-read every
  ``live_interval`` seconds and sent only when it changed.

A stream ends when the browser goes away (the handler is cancelled), when the session
ends (checked at least every :data:`KEEPALIVE` seconds, when a comment line also keeps
proxies from closing an idle stream) and when the console stops. Its producer runs as a
task of its own, owned by the stream, that hands fragments over through a queue of one:
a producer never runs ahead of a browser that reads slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from conveyor.client import ConveyorError, UnauthenticatedError
from conveyor.console import pages
from conveyor.console.web import STATE, ConsoleSession, current_session, describe, fragment

__all__ = ["routes"]

logger = logging.getLogger("conveyor.console")

#: Seconds between keep-alive comments (and session checks) on a quiet stream.
KEEPALIVE = 15.0
#: What the browser waits before reconnecting a broken stream (the SSE ``retry`` field).
RECONNECT_MS = 3000
#: Polling backoff after an error from the coordinator, at most.
_MAX_BACKOFF = 30.0

Events = AsyncIterator[tuple[str, str]]


def event(name: str, data: str) -> bytes:
    """One SSE event; every line of ``data`` gets its ``data:`` prefix."""
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {name}\n{lines}\n".encode()


async def _serve(
    request: web.Request, session: ConsoleSession, produce: Callable[[], Events]
) -> web.StreamResponse:
    state = request.app[STATE]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
    handoff: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async for item in produce():
                await handoff.put(item)
        finally:
            await handoff.put(None)

    producer = asyncio.create_task(pump(), name=f"console live {request.path}")
    me = asyncio.current_task()
    state.streams.add(me)
    try:
        while state.sessions.alive(session):
            try:
                item = await asyncio.wait_for(handoff.get(), KEEPALIVE)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await response.write(event(*item))
        else:
            ended = "Your session ended: reload the page to sign in again."
            notice = fragment(request, "_notice.html", None, message=ended, retrying=False)
            await response.write(event("notice", notice) + event("end", ""))
    except ConnectionResetError:
        pass  # the browser left: nothing more to send
    finally:
        state.streams.discard(me)
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
    return response


def _signed_in(request: web.Request) -> ConsoleSession:
    session = current_session(request)
    if session is None:
        # EventSource does not follow a sign-in redirect usefully; a plain refusal ends it.
        raise web.HTTPUnauthorized(text="signed out")
    return session


async def task_stream(request: web.Request) -> web.StreamResponse:
    session = _signed_in(request)
    task_id = request.match_info["id"]

    async def produce() -> Events:
        try:
            async for current in session.client.watch(task_id):
                found, attempts = await session.client.get_with_attempts(task_id)
                html = fragment(
                    request,
                    "_task_live.html",
                    session,
                    task=found,
                    attempts=attempts,
                    source="stream",
                )
                yield "task", html
                if found.is_terminal and current.is_terminal:
                    break
        except UnauthenticatedError:
            await request.app[STATE].end_session(session)
        except ConveyorError as exc:
            yield "notice", fragment(request, "_notice.html", session, message=describe(exc))
        yield "end", ""

    return await _serve(request, session, produce)


def _polled(
    request: web.Request, session: ConsoleSession, name: str, read: Callable[[], Awaitable[str]]
) -> Callable[[], Events]:
    """A producer that sends ``read``'s fragment each time it changes, and a notice while
    the coordinator does not answer (polling slower then)."""
    interval = request.app[STATE].live_interval

    async def produce() -> Events:
        last = None
        failures = 0
        while True:
            try:
                html = await read()
            except UnauthenticatedError:
                await request.app[STATE].end_session(session)
                yield "end", ""
                return
            except ConveyorError as exc:
                failures += 1
                yield "notice", fragment(request, "_notice.html", session, message=describe(exc))
            else:
                if failures:
                    failures = 0
                    yield "notice", ""
                if html != last:
                    last = html
                    yield name, html
            await asyncio.sleep(min(interval * 2**failures, _MAX_BACKOFF))

    return produce


async def queues_stream(request: web.Request) -> web.StreamResponse:
    session = _signed_in(request)

    async def read() -> str:
        stats = await session.client.queues()
        return fragment(request, "_queues.html", session, queues=stats, source="stream")

    return await _serve(request, session, _polled(request, session, "queues", read))


async def workers_stream(request: web.Request) -> web.StreamResponse:
    session = _signed_in(request)

    async def read() -> str:
        view = await pages.workers_view(session.client, session)
        return fragment(
            request,
            "_workers.html",
            session,
            workers=view.workers,
            cluster=view.cluster,
            source="stream",
        )

    return await _serve(request, session, _polled(request, session, "workers", read))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/live/tasks/{id}", task_stream),
        web.get("/live/queues", queues_stream),
        web.get("/live/workers", workers_stream),
    ]
