"""The console's HTTP surface without a browser: headers on every response, the one-time
sign-in link, sessions that end (lifetime, a revoked key), the sign-in throttle, and the
``conveyor console`` command's refusals. Consoles here run in the test's process when a
test needs settings of its own (a short session lifetime)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from clitools import conveyor
from consoletools import ConsoleProcess, Stack, until
from security import Keys

from conveyor.console import Console, ConsoleConfig, SessionPolicy
from conveyor.console.web import CONTENT_SECURITY_POLICY, SESSION_COOKIE
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.transport._options import API_KEY_ENV

pytestmark = pytest.mark.slow

FORM_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


@asynccontextmanager
async def browsing(base: str) -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: keep cookies of an IP address (127.0.0.1), which aiohttp drops otherwise.
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(base, cookie_jar=jar, timeout=timeout) as session:
        yield session


async def sign_in(http: aiohttp.ClientSession, key: str) -> aiohttp.ClientResponse:
    """The form as a browser fills it: its token first, then the key."""
    async with http.get("/sign-in") as form:
        match = FORM_TOKEN.search(await form.text())
        assert match, "no form token on the sign-in page"
    response = await http.post("/sign-in", data={"form_token": match.group(1), "api_key": key})
    response.release()
    return response


@asynccontextmanager
async def in_process(stack: Stack, **settings: Any) -> AsyncIterator[Console]:
    config = ConsoleConfig(coordinators=stack.address, listen="127.0.0.1:0", **settings)
    async with Console(config) as console:
        yield console


async def test_every_response_carries_the_security_headers(
    stack: Stack, console: ConsoleProcess
) -> None:
    async with browsing(console.url) as http:
        await sign_in(http, stack.acme.user.key)
        for path in ("/sign-in", "/queues", "/tasks/nope", "/static/console.css", "/missing"):
            async with http.get(path, allow_redirects=False) as response:
                headers = response.headers
                assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
                assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
                assert headers["X-Content-Type-Options"] == "nosniff", path
                assert headers["X-Frame-Options"] == "DENY", path
                assert headers["Referrer-Policy"] == "no-referrer", path
        async with http.get("/tasks/nope") as response:
            assert response.status == 400  # not a task id: the API's INVALID_ARGUMENT
        async with http.get("/live/queues") as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            assert stream.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            first = await stream.content.readuntil(b"\n\n")
            assert first == b"retry: 3000\n\n"
            event = await stream.content.readuntil(b"\n\n")
            assert event.startswith(b"event: queues\ndata: ")


async def test_a_sign_in_link_works_once(stack: Stack) -> None:
    async with in_process(stack) as console:
        link = console.sign_in_link(stack.acme.user.key).removeprefix(console.url)
        async with browsing(console.url) as http:
            async with http.get(link) as response:
                assert response.status == 200
                assert 'http-equiv="refresh"' in await response.text()
            async with http.get("/queues", allow_redirects=False) as response:
                assert response.status == 200
        async with browsing(console.url) as other:
            async with other.get(link) as response:
                assert response.status == 400
                assert "used already" in await response.text()
            async with other.get("/queues", allow_redirects=False) as response:
                assert response.status == 303


async def test_sessions_end_after_their_lifetime(stack: Stack) -> None:
    policy = SessionPolicy(idle=60, lifetime=1.0)
    async with in_process(stack, sessions=policy) as console, browsing(console.url) as http:
        await sign_in(http, stack.acme.user.key)
        async with http.get("/queues", allow_redirects=False) as response:
            assert response.status == 200

        async def ended() -> str | None:
            async with http.get("/queues", allow_redirects=False) as response:
                return response.headers["Location"] if response.status == 303 else None

        # However busy: a request every 50 ms does not keep it alive past its lifetime.
        location = await until(ended, "the session to end")
        assert location.startswith("/sign-in?") and "why=expired" in location
        assert len(console.state.sessions) == 0


async def test_a_revoked_key_ends_its_sessions(stack: Stack, console: ConsoleProcess) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        keys = Keys(channel, stack.admin)
        doomed = await keys.create("acme", "read")
        async with browsing(console.url) as http:
            await sign_in(http, doomed.key)
            async with http.get("/queues", allow_redirects=False) as response:
                assert response.status == 200
            await keys.revoke(doomed.id)

            async def refused() -> str | None:
                async with http.get("/queues", allow_redirects=False) as response:
                    return response.headers["Location"] if response.status == 303 else None

            assert "why=refused" in await until(refused, "the console to drop the revoked key")
            async with http.get("/sign-in?why=refused") as response:
                assert "no longer accepts your API key" in await response.text()


async def test_an_empty_key_never_borrows_the_consoles_own(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's key in the console's environment (as the README's export line leaves
    # it, and as conveyor console --api-key reads it) is theirs alone: a browser that
    # signs in without a key must not get a session that calls with it.
    monkeypatch.setenv(API_KEY_ENV, stack.admin)
    async with in_process(stack) as console, browsing(console.url) as http:
        refused = await sign_in(http, "")
        assert refused.status == 401
        async with http.get("/admin", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"].startswith("/sign-in")
        # A one-time link made for no key is no key either.
        link = console.sign_in_link(None).removeprefix(console.url)
        async with http.get(link) as response:
            assert response.status == 200
        async with http.get("/queues", allow_redirects=False) as response:
            assert response.status == 303 and "why=refused" in response.headers["Location"]


async def test_sign_in_sends_the_browser_nowhere_but_this_console(
    stack: Stack, console: ConsoleProcess
) -> None:
    async with browsing(console.url) as http:
        await sign_in(http, stack.acme.user.key)
        # Browsers drop tabs and line breaks from a URL (WHATWG URL parsing) and read a
        # backslash as a slash: each of these would leave for another site.
        for elsewhere in ("//evil.example/", "/\\evil.example/", "/\t/evil.example/",
                          "/\n/evil.example/", "/\r/evil.example/", "https://evil.example/",
                          "/\t\\evil.example/"):  # fmt: skip
            async with http.get(
                "/sign-in", params={"next": elsewhere}, allow_redirects=False
            ) as response:
                assert response.status == 303, elsewhere
                assert response.headers["Location"] == "/queues", elsewhere
        async with http.get(
            "/sign-in", params={"next": "/tasks?queue=emails"}, allow_redirects=False
        ) as response:
            assert response.headers["Location"] == "/tasks?queue=emails"


async def test_failed_sign_ins_stop_before_the_coordinator_would_throttle(
    stack: Stack, console: ConsoleProcess
) -> None:
    async with browsing(console.url) as http:
        malformed = await sign_in(http, "not-a-key")
        assert malformed.status == 400  # refused here: it never reached the coordinator
        statuses: list[int] = []
        while 429 not in statuses and len(statuses) < 30:
            statuses.append((await sign_in(http, api_keys.generate()[1])).status)
        # Ten unknown keys at once (a few more as the throttle refills while they are
        # checked), then the console holds back, well before the coordinator's 30.
        refused = statuses[:-1]
        assert statuses[-1] == 429 and set(refused) == {401}, statuses
        assert 10 <= len(refused) < 20, statuses
    async with browsing(console.url) as http:
        assert (await sign_in(http, stack.acme.user.key)).status == 429
    # The coordinator never throttled the console's address: its calls still work.
    async with stack.client(stack.acme.user.key) as client:
        await client.queues()


async def test_conveyor_console_refuses_plain_http_off_loopback() -> None:
    done = await conveyor("console", "--listen", "0.0.0.0:0")
    assert done.code == 2
    assert "--https-cert" in done.err and "--allow-plain-http" in done.err
    done = await conveyor("console", "--listen", "nowhere")
    assert done.code == 2 and "HOST:PORT" in done.err


async def test_conveyor_console_prints_a_sign_in_link_for_its_key(
    stack: Stack, tmp_path: Path
) -> None:
    process = ConsoleProcess(stack.address, tmp_path, "--api-key", stack.admin)
    process.start()
    try:
        banner = await process.ready()
        (link,) = re.findall(r"sign in: (http://\S+)", banner)
        assert stack.admin not in banner
        async with browsing(process.url) as http:
            async with http.get(link.removeprefix(process.url)) as response:
                assert response.status == 200
            assert SESSION_COOKIE in {c.key for c in http.cookie_jar}
            async with http.get("/admin", allow_redirects=False) as response:
                assert response.status == 200  # signed in with the admin key
    finally:
        await process.stop()


async def test_pause_and_resume_a_schedule_and_find_it_by_id(
    stack: Stack, console: ConsoleProcess
) -> None:
    async with stack.client(stack.acme.user.key) as client:
        made = await client.create_schedule("hourly/report", "0 * * * *", "report")
    async with browsing(console.url) as http:
        await sign_in(http, stack.acme.user.key)
        async with http.get("/schedules") as page:
            html = await page.text()
            assert "hourly/report" in html
            (token,) = set(re.findall(r'name="csrf" value="([^"]+)"', html))
        for action, paused in (("pause", True), ("resume", False)):
            form = {"csrf": token, "name": "hourly/report", "back": "/schedules"}
            async with http.post(f"/schedule/{action}", data=form) as answer:
                assert answer.status == 200 and answer.url.path == "/schedules"
                word = "paused" if paused else "active"
                assert f"Schedule hourly/report is {word}." in await answer.text()
            async with stack.client(stack.acme.user.key) as client:
                assert (await client.get_schedule("hourly/report")).paused is paused
        # A fired task knows its schedule by id only: the console finds the name.
        async with http.get(f"/schedules/by-id/{made.id}") as page:
            assert page.url.path == "/schedule" and page.url.query["name"] == "hourly/report"
            assert "Next fire times" in await page.text()


async def test_tasks_filter_by_label_and_time_page_by_page(stack: Stack) -> None:
    async with stack.client(stack.acme.user.key) as client:
        billing = [
            (await client.submit("invoice", n, labels={"team": "billing"})).id for n in range(3)
        ]
        other = (await client.submit("invoice", 9, labels={"team": "search"})).id
        # The API: labels and a creation window, newest first.
        page = await client.list(labels={"team": "billing"}, page_size=2)
        assert [t.id for t in page] == billing[:0:-1] and page.next_page_token
        later = await client.list(created_after=datetime.now(UTC) + timedelta(minutes=1))
        assert later.items == []
        earlier = await client.list(created_before=datetime.now(UTC) + timedelta(minutes=1))
        assert {*billing, other} <= {t.id for t in earlier}
    async with in_process(stack, page_size=2) as console, browsing(console.url) as http:
        await sign_in(http, stack.acme.user.key)
        seen: list[str] = []
        path: str | None = "/tasks?label=team%3Dbilling&after=2000-01-01T00:00"
        while path:  # the pager's links keep the filters
            async with http.get(path) as response:
                html = await response.text()
            seen += re.findall(r'href="/tasks/([0-9a-f-]{36})"', html)
            found = re.search(r'rel="next" href="([^"]+)"', html)
            path = found and found[1].replace("&amp;", "&")
        assert seen == billing[::-1], seen
        assert "not yet in the API" not in html  # both filters work: no stale hint
        async with http.get("/tasks", params={"before": "not a time"}) as response:
            assert response.status == 400 and "is not a time" in await response.text()
