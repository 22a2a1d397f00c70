"""Signing in and out.

- ``GET /sign-in`` shows the form; with ``?token=`` it redeems a one-time link instead.
- ``POST /sign-in`` checks the key with the coordinator (``ListQueues``: an unknown,
  revoked or expired key is refused there; a key without the ``read`` scope still signs
  in, and the pages say what it may not do), then starts a session.
- ``POST /sign-out`` ends it.

The form is protected against login CSRF by a double-submit token: a random value in a
SameSite=Strict cookie scoped to ``/sign-in`` and in the form, which must match. Failed
sign-ins spend from a throttle (:class:`~conveyor.console.sessions.Throttle`) before the
coordinator is asked, so the console never gets its own address throttled there.
"""

from __future__ import annotations

from aiohttp import web

from conveyor.client import (
    AsyncClient,
    DeadlineExceededError,
    PermissionDeniedError,
    RPCError,
    UnauthenticatedError,
    UnavailableError,
)
from conveyor.console.sessions import new_token, same_token
from conveyor.console.web import (
    SESSION_COOKIE,
    STATE,
    ConsoleSession,
    action,
    current_session,
    describe,
    local_path,
    redirect,
    render,
    sign_in_url,
)
from conveyor.coordinator.tenancy import keys as api_keys

__all__ = ["routes"]

FORM_COOKIE = "conveyor_sign_in"

#: Why the sign-in page is shown, by the ``why`` parameter (never text from the URL).
REASONS = {
    "refused": "The coordinator no longer accepts your API key (revoked or expired). "
    "Sign in with a valid one.",
    "expired": "Your session ended. Sign in again.",
    "signed-out": "Signed out.",
    "link": "That sign-in link was used already, or is too old. Sign in with your API key "
    "(conveyor dev prints it at every start).",
}


def secure(request: web.Request) -> bool:
    """Whether the browser reached the console over HTTPS (the cookies are Secure then)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_session_cookie(request: web.Request, response: web.StreamResponse, value: str) -> None:
    """The session's cookie: script cannot read it, no other site's request carries it."""
    response.set_cookie(
        SESSION_COOKIE, value, httponly=True, samesite="Strict", secure=secure(request), path="/"
    )


def _form(
    request: web.Request, *, status: int = 200, error: str = "", why: str | None = None
) -> web.Response:
    token = new_token()
    response = render(
        request,
        "sign_in.html",
        None,
        status=status,
        form_token=token,
        next=local_path(request.query.get("next")),
        error=error,
        notice=REASONS.get(why or request.query.get("why", ""), ""),
    )
    response.set_cookie(
        FORM_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=secure(request),
        path="/sign-in",
        max_age=3600,
    )
    return response


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    """``GET /sign-in``: the form, or a one-time link redeemed."""
    token = request.query.get("token")
    if token is not None:
        return await _redeem(request, token)
    if current_session(request) is not None:
        raise redirect(local_path(request.query.get("next")))
    return _form(request)


async def _redeem(request: web.Request, token: str) -> web.StreamResponse:
    state = request.app[STATE]
    valid, key = state.links.redeem(token)
    if not valid:
        return _form(request, status=400, why="link")
    session = await _start(request, state.make_client(key), key)
    # A page that moves on by itself rather than a redirect: a browser opening the link
    # from another application may treat a redirect as part of that cross-site
    # navigation and hold back the new SameSite=Strict cookie on its way to /queues.
    response = render(request, "signed_in.html", session, flashes=[])
    set_session_cookie(request, response, session.id)
    return response


async def _start(request: web.Request, client: AsyncClient, key: str | None) -> ConsoleSession:
    state = request.app[STATE]
    session, pushed_out = state.sessions.add(client, api_keys.parse(key or "") or "")
    await state.close_clients(pushed_out)
    return session


async def sign_in(request: web.Request) -> web.StreamResponse:
    """``POST /sign-in``: checks the key with the coordinator, then starts a session."""
    state = request.app[STATE]
    form = await request.post()
    given = form.get("form_token")
    if not same_token(given if isinstance(given, str) else None,
                      request.cookies.get(FORM_COOKIE, "")):  # fmt: skip
        return _form(request, status=403, error="The form was too old: try again.")
    key = str(form.get("api_key", "")).strip()
    if key and api_keys.parse(key) is None:
        # Refused here: a malformed key never reaches the coordinator.
        return _form(
            request, status=400, error="That is not an API key: they look like cvk_..._..."
        )
    wait = state.sign_in_throttle.wait()
    if wait > 0:
        return _form(
            request,
            status=429,
            error=f"Too many failed sign-ins: try again in {wait:.0f} s.",
        )
    state.sign_in_throttle.spend()
    client = state.make_client(key or None)
    problem = await _check(client)
    if problem is not None:
        await client.close()
        if problem[0] != 401:
            state.sign_in_throttle.refund()  # not a refused key: nothing to hold back
        return _form(request, status=problem[0], error=problem[1])
    state.sign_in_throttle.refund()
    session = await _start(request, client, key)
    response = redirect(local_path(str(form.get("next", ""))))
    set_session_cookie(request, response, session.id)
    response.del_cookie(FORM_COOKIE, path="/sign-in")
    raise response


async def _check(client: AsyncClient) -> tuple[int, str] | None:
    """Why the coordinator refuses the client's key, or None when it accepts it."""
    try:
        await client.queues()
    except UnauthenticatedError as exc:
        problem = exc.metadata.get("problem", "")
        if problem == "missing":
            return 401, "The coordinator needs an API key."
        return 401, f"The coordinator refused this API key ({problem or 'unknown'})."
    except PermissionDeniedError:
        pass  # a valid key without the read scope: the pages say what it may not do
    except (UnavailableError, DeadlineExceededError) as exc:
        return 503, f"Cannot reach the coordinator: {exc.server_message or exc}"
    except RPCError as exc:
        return 502, describe(exc)
    return None


@action
async def sign_out(request: web.Request, session: ConsoleSession) -> web.StreamResponse:
    """``POST /sign-out``."""
    await request.app[STATE].end_session(session)
    response = redirect(sign_in_url(why="signed-out"))
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def routes() -> list[web.RouteDef]:
    return [
        web.get("/sign-in", sign_in_page),
        web.post("/sign-in", sign_in),
        web.post("/sign-out", sign_out),
    ]
