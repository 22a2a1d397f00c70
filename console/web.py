"""The request machinery every page shares: the console's state, the signed-in session,
rendering, the CSRF check, and how API errors become pages.

A page handler is written as ``async def page(request, session) -> Response`` and wrapped:

- :func:`page` for GET: no session sends the browser to sign in; an error from the API
  becomes a page that says what went wrong (the coordinator refusing the key ends the
  session; a missing scope, a missing task, an unreachable coordinator each have theirs).
- :func:`action` for POST: the same, after the session's CSRF token is checked (403
  without it); its answer is a redirect (Post/Redirect/Get) with a flash message.

Every response, errors and streams included, carries the headers of :func:`secure_headers`:
a Content-Security-Policy that allows no inline script, style or handler and nothing from
another origin, so markup that reached a page could still run nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from conveyor.client import (
    AsyncClient,
    ConveyorError,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidStateError,
    PermissionDeniedError,
    RPCError,
    ScheduleNotFoundError,
    TaskNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from conveyor.console import present
from conveyor.console.sessions import Session, SessionStore, SignInLinks, Throttle, same_token

__all__ = [
    "SESSION_COOKIE",
    "STATE",
    "ConsoleState",
    "Handler",
    "action",
    "page",
    "redirect",
    "render",
    "secure_headers",
    "sign_in_url",
]

logger = logging.getLogger("conveyor.console")

SESSION_COOKIE = "conveyor_session"
HERE = Path(__file__).parent

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)

ConsoleSession = Session[AsyncClient]
Handler = Callable[[web.Request, ConsoleSession], Awaitable[web.StreamResponse]]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        # Every template, whatever its name: nothing a task holds is ever markup.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        stamp=present.stamp,
        duration=present.duration,
        payload=present.payload_view,
        error=present.error_view,
        short_id=lambda value: value[-12:] if value else "",
        age=present.ago,
        tally=present.tally,
        pb_time=_pb_time,
    )
    env.globals.update(query=query_path)
    return env


def _pb_time(value: Any) -> datetime | None:
    """A protobuf Timestamp as an aware datetime; None when unset."""
    if not (value.seconds or value.nanos):
        return None
    result: datetime = value.ToDatetime(tzinfo=UTC)
    return result


def query_path(path: str, **params: Any) -> str:
    """``path?k=v...`` with the non-empty parameters, encoded (for links in templates)."""
    given = {k: v for k, v in params.items() if v not in (None, "", False)}
    return f"{path}?{urlencode(given)}" if given else path


@dataclass(eq=False)
class ConsoleState:
    """What the console's handlers share (one per :class:`~conveyor.console.Console`)."""

    #: Makes the API client of a session that signs in with this key (None: no key).
    make_client: Callable[[str | None], AsyncClient]
    sessions: SessionStore[AsyncClient]
    links: SignInLinks
    #: Failed sign-ins from anywhere (see :class:`Throttle`).
    sign_in_throttle: Throttle
    #: Rows per page of every list.
    page_size: int = 50
    #: Seconds between the polls behind the live queue and worker views.
    live_interval: float = 2.0
    env: jinja2.Environment = field(default_factory=_environment)
    #: The live streams being served, ended when the console stops.
    streams: set[Any] = field(default_factory=set)

    async def close_clients(self, clients: list[AsyncClient]) -> None:
        """Closes the clients of ended sessions."""
        for client in clients:
            try:
                await client.close()
            except Exception:  # one that fails to close must not keep the others open
                logger.exception("closing a session's client failed")

    async def end_session(self, session: ConsoleSession) -> None:
        """Ends ``session`` (sign-out, a refused key) and closes its client."""
        client = self.sessions.end(session.id)
        if client is not None:
            await self.close_clients([client])


STATE = web.AppKey("console_state", ConsoleState)


def secure_headers(response: web.StreamResponse) -> None:
    """The headers every response carries (set before it is sent)."""
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    # Sign-in links carry a token in the URL; task ids are nobody else's business either.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")


def current_session(request: web.Request) -> ConsoleSession | None:
    """The request's live session, from its cookie; None when signed out."""
    return request.app[STATE].sessions.get(request.cookies.get(SESSION_COOKIE))


def sign_in_url(next_path: str | None = None, why: str | None = None) -> str:
    """The sign-in page, with where to go next (a local path) and why (a known reason)."""
    return query_path("/sign-in", next=next_path, why=why)


def render(
    request: web.Request,
    template: str,
    session: ConsoleSession | None,
    *,
    status: int = 200,
    **context: Any,
) -> web.Response:
    """Renders ``template`` as a whole page for ``session`` (its flash messages shown)."""
    if "flashes" not in context:
        context["flashes"] = session.take_flashes() if session else []
    text = fragment(request, template, session, **context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def fragment(
    request: web.Request, template: str, session: ConsoleSession | None, **context: Any
) -> str:
    """Renders ``template`` (a page or a fragment) to text; only :func:`render` shows (and
    so uses up) the session's flash messages: a live update must not take them."""
    state = request.app[STATE]
    values = {
        "session": session,
        "csrf": session.csrf if session else "",
        "flashes": [],
        "now": datetime.now(UTC),
        "path": request.path,
        "page_size": state.page_size,
        **context,
    }
    return state.env.get_template(template).render(values)


def redirect(location: str) -> web.HTTPSeeOther:
    """A 303 to ``location`` (raise it)."""
    return web.HTTPSeeOther(location)


def local_path(value: str | None, default: str = "/queues") -> str:
    """``value`` when it is a path on this console (never another site), else ``default``.

    Browsers drop tabs and line breaks from a URL and read ``\\`` as ``/`` (WHATWG URL
    parsing), so ``/<tab>/evil`` or ``/\\evil`` would leave for another host: a value
    holding any control character or backslash is refused whole rather than cleaned.
    """
    if (
        value
        and value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and not any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)
    ):
        return value
    return default


def page(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wraps a GET handler: signed in, and API errors shown as pages."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        session = current_session(request)
        if session is None:
            why = "expired" if request.cookies.get(SESSION_COOKIE) else None
            raise redirect(sign_in_url(request.path_qs, why))
        try:
            return await handler(request, session)
        except ConveyorError as exc:
            return await error_page(request, session, exc)

    return wrapped


def action(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wraps a POST handler: signed in, the CSRF token checked, errors as flash messages."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        session = current_session(request)
        form = await request.post()
        token = form.get("csrf")
        if session is None or not same_token(token if isinstance(token, str) else None,
                                             session.csrf):  # fmt: skip
            # No session or no token: the same refusal, so it tells a forger nothing.
            return forbidden(request, session)
        try:
            return await handler(request, session)
        except UnauthenticatedError:
            await request.app[STATE].end_session(session)
            raise redirect(sign_in_url(why="refused")) from None
        except ConveyorError as exc:
            session.flash(describe(exc), error=True)
            back = form.get("back")
            raise redirect(local_path(back if isinstance(back, str) else None)) from None

    return wrapped


def forbidden(request: web.Request, session: ConsoleSession | None) -> web.Response:
    """403 for a POST without this session's CSRF token (or without a session)."""
    return render(
        request,
        "error.html",
        session,
        status=403,
        title="Refused",
        message=(
            "This action did not carry the page's security token (it may come from another "
            "site, or from a page older than your sign-in). Reload the page and try again."
        ),
    )


def describe(exc: ConveyorError) -> str:
    """An API error as one line for a person (the server's words where it sent some: the
    SDK's own advice speaks to programmers)."""
    if isinstance(exc, PermissionDeniedError):
        return f"Your API key may not do this: it needs the {exc.scope or 'missing'} scope."
    said = exc.server_message if isinstance(exc, RPCError) and exc.server_message else str(exc)
    if isinstance(exc, InvalidStateError):
        return f"Not possible in the task's current state: {said}"
    if isinstance(exc, UnavailableError | DeadlineExceededError):
        return f"The coordinator did not answer: {said}"
    return said


async def error_page(
    request: web.Request, session: ConsoleSession, exc: ConveyorError
) -> web.StreamResponse:
    """The page for an API error met while reading a page."""
    if isinstance(exc, UnauthenticatedError):
        # Revoked or expired: every further call would be one more failed authentication
        # on the coordinator's books (and its throttle's), so the session ends here.
        await request.app[STATE].end_session(session)
        raise redirect(sign_in_url(request.path_qs, why="refused"))
    status, title = 500, "Error"
    if isinstance(exc, PermissionDeniedError):
        status, title = 403, "Not allowed"
        if exc.scope:
            session.denied.add(exc.scope)
    elif isinstance(exc, TaskNotFoundError | ScheduleNotFoundError):
        status, title = 404, "Not found"
    elif isinstance(exc, InvalidArgumentError):
        status, title = 400, "Not understood"
    elif isinstance(exc, UnavailableError | DeadlineExceededError):
        status, title = 503, "Coordinator unavailable"
    return render(request, "error.html", session, status=status, title=title, message=describe(exc))
