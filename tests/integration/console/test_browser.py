"""The console in a real browser (Debian's Chromium through Playwright), against the real
``conveyor console`` process and a coordinator that requires keys.

Each test signs people in with their own keys, as an operator would, and looks at what the
pages show: the sign-in and its cookie, a failing task's error and traceback found from
the dead letters and redriven, a state change that arrives without a reload, one tenant
never seeing another's, markup in everything a task carries running nothing, and an
action without its CSRF token refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from consoletools import ConsoleProcess, Person, Stack, Workers, person, screenshot_dir, until
from playwright.async_api import Browser
from security import Keys

from conveyor.client import InvalidArgumentError, TaskState
from conveyor.console.web import SESSION_COOKIE
from conveyor.worker import NonRetryableError, TaskContext

pytestmark = pytest.mark.slow

MARKUP = "<img src=x onerror=alert('img')>"
SCRIPT = "<script>alert('script')</script>"


class CardDeclinedError(RuntimeError):
    """What the failing handler of these tests raises."""


async def _state(stack: Stack, key: str, task_id: str) -> TaskState:
    async with stack.client(key) as client:
        return (await client.get(task_id)).state


async def _wait_state(stack: Stack, key: str, task_id: str, state: TaskState) -> None:
    async def reached() -> bool | None:
        return True if await _state(stack, key, task_id) is state else None

    await until(reached, f"task {task_id} {state.name}")


async def _csrf(who: Person) -> str:
    token = await who.page.get_attribute("input[name=csrf]", "value")
    assert token
    return token


async def test_sign_in_pages_screenshots_and_sign_out(
    stack: Stack, console: ConsoleProcess, browser: Browser, workers: Workers, tmp_path: Path
) -> None:
    acme = stack.acme
    worker = workers.make(acme.worker, queues=["emails", "reports"], worker_id="mail-1")

    @worker.task("send-email")
    async def send_email(ctx: TaskContext, payload: Any) -> dict[str, str]:
        if payload.get("to", "").endswith("@invalid"):
            raise CardDeclinedError(f"mailbox {payload['to']} does not exist")
        return {"sent": payload["to"]}

    await workers.start(worker)
    async with stack.client(acme.user.key) as client:
        done = await client.submit("send-email", {"to": "ada@example.com"}, queue="emails")
        dead = await client.submit(
            "send-email", {"to": "bob@invalid"}, queue="emails", max_attempts=2
        )
        await client.submit("render-report", {"month": "2025-03"}, queue="reports", priority=5)
        await client.create_schedule(
            "nightly-report", "0 3 * * *", "render-report", {"month": "latest"}, queue="reports"
        )
        await client.wait(done.id, timeout=15)
    await _wait_state(stack, acme.user.key, dead.id, TaskState.DEAD)

    shots = screenshot_dir(tmp_path / "screenshots")
    async with person(browser, console.url) as ada:
        # Signed out, every page leads to the sign-in form, and back after it.
        await ada.go("/tasks")
        assert "/sign-in" in ada.page.url
        await ada.page.fill("#api_key", acme.user.key)
        await ada.page.click("form[action='/sign-in'] button[type=submit]")
        await ada.page.wait_for_url(f"{console.url}/tasks")

        cookie = await ada.cookie(SESSION_COOKIE)
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["secure"] is False  # plain HTTP on loopback; Secure under TLS
        assert acme.user.key not in cookie["value"] and acme.user.id not in cookie["value"]
        assert len(cookie["value"]) >= 40  # 256 random bits

        await ada.go("/queues")
        text = await ada.text()
        assert "emails" in text and "reports" in text
        await ada.page.screenshot(path=shots / "console-queues.png")

        await ada.go("/tasks")
        assert "send-email" in await ada.text()
        await ada.page.screenshot(path=shots / "console-tasks.png")

        await ada.go(f"/tasks/{dead.id}")
        await ada.page.click("details summary")
        text = await ada.text()
        assert "does not exist" in text and "dead" in text
        await ada.page.screenshot(path=shots / "console-task.png", full_page=True)

        await ada.go("/dead")
        assert "CardDeclinedError: mailbox bob@invalid does not exist" in await ada.text()
        await ada.page.screenshot(path=shots / "console-dead-letters.png")

        await ada.go("/schedules")
        assert "nightly-report" in await ada.text()
        await ada.page.click("text=nightly-report")
        assert "Next fire times" in await ada.text()
        await ada.page.screenshot(path=shots / "console-schedule.png")

        # A tenant's key is no admin key: the coordinator says so, and the page too.
        response = await ada.page.goto(console.url + "/admin")
        assert response is not None and response.status == 403
        assert "admin scope" in await ada.text()
        assert ada.errors == ["error: Failed to load resource: the server responded with a "
                              "status of 403 (Forbidden)"]  # fmt: skip
        ada.errors.clear()  # Chromium's note of that 403, the one expected

        # Sign-out ends the session on the server: the old cookie opens nothing.
        await ada.page.click("form[action='/sign-out'] button")
        await ada.page.wait_for_url(re.compile(r".*/sign-in\?why=signed-out$"))
        assert "Signed out." in await ada.text()
        await ada.context.add_cookies(
            [{"name": SESSION_COOKIE, "value": cookie["value"], "url": console.url}]
        )
        await ada.go("/queues")
        assert "/sign-in" in ada.page.url
        assert ada.errors == [] and ada.dialogs == []

    async with person(browser, console.url) as admin:
        await admin.sign_in(stack.admin)
        await admin.go("/workers")
        text = await admin.text()
        assert "mail-1" in text and "send-email" in text
        await admin.page.screenshot(path=shots / "console-workers.png")
        await admin.go("/admin")
        assert "acme" in await admin.text() and "globex" in await admin.text()
        await admin.page.screenshot(path=shots / "console-admin.png")
        await admin.go("/admin/keys")
        assert acme.user.id in await admin.text()
        assert acme.user.key not in await admin.page.content()
        await admin.go("/admin/audit")
        await admin.page.click("text=Verify the chain")
        assert "Audit log intact" in await admin.page.inner_text("#verification")
        assert admin.errors == [] and admin.dialogs == []


async def test_dead_letters_show_the_traceback_and_redrive(
    stack: Stack, console: ConsoleProcess, browser: Browser, workers: Workers
) -> None:
    acme = stack.acme
    broken = True
    worker = workers.make(acme.worker, queues=["payments"])

    @worker.task("charge")
    async def charge(ctx: TaskContext, payload: Any) -> dict[str, Any]:
        if broken:
            raise CardDeclinedError(f"card {payload['card']} declined")
        return {"charged": payload["card"]}

    await workers.start(worker)
    async with stack.client(acme.user.key) as client:
        tasks = [
            await client.submit("charge", {"card": card}, queue="payments", max_attempts=2)
            for card in ("4242", "1881", "5555")
        ]
    for task in tasks:
        await _wait_state(stack, acme.user.key, task.id, TaskState.DEAD)

    async with person(browser, console.url) as ops:
        await ops.sign_in(acme.user.key)
        await ops.go("/dead")
        groups = await ops.page.inner_text("table.groups")
        # One group per error line, counted by the coordinator over every dead task.
        assert "CardDeclinedError: card 4242 declined" in groups and "charge" in groups
        # From the dead letters to the task, its attempts and the traceback.
        await ops.page.click(f"a[href='/tasks/{tasks[0].id}']")
        await ops.page.wait_for_url(f"{console.url}/tasks/{tasks[0].id}")
        attempts = ops.page.locator("ol.timeline > li")
        assert await attempts.count() == 2
        first = attempts.nth(0)
        assert "CardDeclinedError: card 4242 declined" in await first.inner_text()
        await first.locator("summary").click()
        traceback = await first.locator("pre.traceback").inner_text()
        assert "Traceback (most recent call last)" in traceback
        assert "in charge" in traceback and "test_browser.py" in traceback

        # Redriven from the task page: it succeeds this time.
        broken = False
        await ops.page.click("button:text('Retry')")
        await ops.page.wait_for_url(f"{console.url}/tasks/{tasks[0].id}")
        assert "redriven" in await ops.text()
        await _wait_state(stack, acme.user.key, tasks[0].id, TaskState.SUCCEEDED)

        # The other one from the dead letters, ticked and retried.
        await ops.go("/dead")
        await ops.page.check(f"input[name=task][value='{tasks[1].id}']")
        await ops.page.click("button:text('Retry selected')")
        await ops.page.wait_for_url(f"{console.url}/dead")
        assert "Redrove 1 of 1 dead task(s)." in await ops.text()
        await _wait_state(stack, acme.user.key, tasks[1].id, TaskState.SUCCEEDED)
        # The last one by its group's button (a bulk RetryTasks by type and error).
        await ops.page.click("button:text('Retry all 1')")
        await ops.page.wait_for_url(f"{console.url}/dead")
        assert "Redrove 1 dead task(s) of charge: CardDeclinedError: card 5555" in await ops.text()
        await _wait_state(stack, acme.user.key, tasks[2].id, TaskState.SUCCEEDED)
        await ops.go("/dead")
        assert "No dead task." in await ops.text()
        assert ops.errors == [] and ops.dialogs == []


async def test_a_state_change_arrives_without_a_reload(
    stack: Stack, console: ConsoleProcess, browser: Browser, workers: Workers
) -> None:
    acme = stack.acme
    async with stack.client(acme.user.key) as client:
        task = await client.submit("gate", {"open": True}, queue="live")

    async with person(browser, console.url) as ops:
        await ops.sign_in(acme.user.key)
        queues = await ops.context.new_page()
        queue_loads: list[str] = []
        queues.on(
            "framenavigated",
            lambda frame: queue_loads.append(frame.url) if frame == queues.main_frame else None,
        )
        await queues.goto(console.url + "/queues")
        await queues.wait_for_selector("[data-source=stream]")  # its live stream is on
        row = queues.locator("tr[data-queue=live]")
        assert re.search(r"live\s+1\s+0", await row.inner_text())  # pending 1, running 0

        await ops.go(f"/tasks/{task.id}")
        await ops.page.wait_for_selector("[data-source=stream]")
        status = ops.page.locator("#live .status")
        assert "pending" in await status.inner_text()
        assert "no connected worker serves type 'gate'" in await status.inner_text()
        loaded = list(ops.navigations)

        # Nothing runs it until a worker for its type connects; then it finishes.
        worker = workers.make(acme.worker, queues=["live"])

        @worker.task("gate")
        async def gate(ctx: TaskContext, payload: Any) -> dict[str, Any]:
            return {"passed": payload["open"]}

        await workers.start(worker)

        async def shown() -> bool | None:
            return True if "succeeded" in await status.inner_text() else None

        await until(shown, "the task page showing the task succeeded")
        assert '"passed": true' in await ops.text()  # the result, pretty-printed JSON
        assert ops.navigations == loaded, "the page was reloaded or left"

        async def drained() -> bool | None:
            # The queue leaves the list once nothing waits, runs or died there.
            table = await queues.inner_text("#queues")
            return True if re.search(r"live\s+0\s+0", table) or "live" not in table else None

        await until(drained, "the queues page showing the queue drained")
        assert queue_loads == [console.url + "/queues"], "the queues page was reloaded"
        assert ops.errors == [] and ops.dialogs == []


async def test_a_tenant_never_sees_another_tenants_work(
    stack: Stack, console: ConsoleProcess, browser: Browser, workers: Workers
) -> None:
    globex = stack.globex
    worker = workers.make(globex.worker, queues=["globex-secret"], worker_id="globex-worker-1")

    @worker.task("globex-type")
    async def fail(ctx: TaskContext, payload: Any) -> None:
        raise NonRetryableError("globex-secret-error")

    await workers.start(worker)
    async with stack.client(globex.user.key) as client:
        secret = await client.submit("globex-type", {"globex": 1}, queue="globex-secret")
        await client.submit("globex-idle", None, queue="globex-pending")
        await client.create_schedule("globex-schedule", "0 4 * * *", "globex-type")
    await _wait_state(stack, globex.user.key, secret.id, TaskState.DEAD)
    async with stack.client(stack.acme.user.key) as client:
        await client.submit("acme-type", {"acme": 1}, queue="acme-queue")

    async with person(browser, console.url) as acme:
        await acme.sign_in(stack.acme.user.key)
        for path in ("/queues", "/tasks", "/dead", "/schedules", "/workers"):
            await acme.go(path)
            html = await acme.page.content()
            assert "globex" not in html.lower(), f"{path} shows globex's work"
        await acme.go("/queues")
        assert "acme-queue" in await acme.text()

        response = await acme.page.goto(f"{console.url}/tasks/{secret.id}")
        assert response is not None and response.status == 404
        response = await acme.page.goto(f"{console.url}/schedule?name=globex-schedule")
        assert response is not None and response.status == 404
        # Acting on the other tenant's task with acme's own session and token: not found.
        await acme.go("/queues")
        answer = await acme.page.request.post(
            f"{console.url}/tasks/{secret.id}/retry",
            form={"csrf": await _csrf(acme), "back": "/dead"},
        )
        assert answer.ok  # the redirect back, with the refusal as its flash message
        assert f"task {secret.id} does not exist" in await answer.text()
        assert await _state(stack, globex.user.key, secret.id) is TaskState.DEAD

    async with person(browser, console.url) as admin:  # an admin sees every worker
        await admin.sign_in(stack.admin)
        await admin.go("/workers")
        assert "globex-worker-1" in await admin.text()


async def test_markup_in_what_a_task_carries_runs_nothing(
    stack: Stack, console: ConsoleProcess, browser: Browser, workers: Workers
) -> None:
    acme = stack.acme
    async with stack.client(acme.user.key) as client:
        # Types and queues are names: markup is refused at the door.
        with pytest.raises(InvalidArgumentError):
            await client.submit(MARKUP, None)

    worker = workers.make(acme.worker, queues=["markup"], worker_id=MARKUP)

    @worker.task("render")
    async def render(ctx: TaskContext, payload: Any) -> None:
        raise NonRetryableError(f"{MARKUP} {SCRIPT} went wrong")

    await workers.start(worker)
    labels = {MARKUP: SCRIPT, "note": MARKUP}
    async with stack.client(acme.user.key) as client:
        failing = await client.submit(
            "render", {"html": MARKUP + SCRIPT}, queue="markup", labels=labels,
            idempotency_key=MARKUP + SCRIPT,
        )  # fmt: skip
        raw = await client.submit(
            "never-run", (SCRIPT + MARKUP).encode(), queue="markup", content_type="text/html"
        )
        await client.create_schedule(
            "markup-schedule", "0 5 * * *", "render", {"html": SCRIPT}, labels=labels
        )
        # A refused call is audited with what it named: markup in the audit log too.
        with pytest.raises(InvalidArgumentError):
            await client.cancel(MARKUP)
    await _wait_state(stack, acme.user.key, failing.id, TaskState.DEAD)
    async with grpc.aio.insecure_channel(stack.address) as channel:
        await Keys(channel, stack.admin).create("acme", "read", description=MARKUP + SCRIPT)

    # (path, whether it shows markup, whether a live stream updates it)
    pages = [
        ("/queues", False, True),
        ("/tasks", True, False),
        (f"/tasks/{raw.id}", True, True),
        (f"/tasks/{failing.id}", True, False),
        ("/schedules", False, False),
        ("/schedule?name=markup-schedule", True, False),
        ("/dead", True, False),
    ]
    admin_pages = [
        ("/workers", True, True),
        ("/admin/keys", True, False),
        ("/admin/audit", True, False),
    ]
    for key, paths in ((acme.user.key, pages), (stack.admin, admin_pages)):
        async with person(browser, console.url) as who:
            await who.sign_in(key)
            for path, shows, live in paths:
                await who.go(path)
                if live:  # a fragment from the stream swapped in, markup and all
                    await who.page.wait_for_selector("[data-source=stream]")
                text = await who.text()
                # The markup is shown as the text it is ...
                assert not shows or MARKUP in text or SCRIPT in text, path
                # ... and nothing of it became an element.
                assert await who.page.locator("main img, main script").count() == 0, path
                assert await who.page.locator("script").count() == 2, path  # htmx, sse
            assert who.dialogs == [], who.dialogs
            assert who.errors == [], who.errors


async def test_an_action_without_the_csrf_token_is_refused(
    stack: Stack, console: ConsoleProcess, browser: Browser
) -> None:
    acme = stack.acme
    async with stack.client(acme.user.key) as client:
        task = await client.submit("nobody-runs-this", None, queue="idle")

    async with person(browser, console.url) as ops:
        await ops.sign_in(acme.user.key)
        await ops.go(f"/tasks/{task.id}")
        token = await _csrf(ops)
        cancel = f"{console.url}/tasks/{task.id}/cancel"
        forms: list[dict[str, str | float | bool]] = [
            {},
            {"csrf": "forged" + token[6:]},
            {"csrf": ""},
        ]
        for form in forms:
            answer = await ops.page.request.post(cancel, form=form)
            assert answer.status == 403, form
            assert "security token" in await answer.text()
        answer = await ops.page.request.post(f"{console.url}/sign-out", form={})
        assert answer.status == 403
        assert await _state(stack, acme.user.key, task.id) is TaskState.PENDING

        # The same request with the page's token goes through (the session is still on).
        answer = await ops.page.request.post(cancel, form={"csrf": token})
        assert answer.ok and "CANCELLED" in await answer.text()
        assert await _state(stack, acme.user.key, task.id) is TaskState.CANCELLED

    async with person(browser, console.url) as stranger:  # no session at all
        answer = await stranger.page.request.post(cancel, form={"csrf": token})
        assert answer.status == 403
