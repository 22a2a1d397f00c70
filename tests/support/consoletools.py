"""Helpers of the console's browser tests (tests/integration/console): the console process,
Debian's Chromium driven by Playwright, people signed in, workers in the test's process.

Chromium is found at ``CONVEYOR_CHROMIUM`` or as ``chromium`` on PATH; without it the
tests fail (never skip), saying how to get it: browsers cannot be downloaded here, and
``.ci/run`` installs Debian's package.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Dialog, Frame, Page
from processes import ManagedProcess, free_port
from security import Key
from testsupport import eventually

from conveyor.client import AsyncClient
from conveyor.worker import Worker

CLI = [sys.executable, "-m", "conveyor.cli.main"]
# What every launch passes: no sandbox (root in CI), nothing that reaches the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: The scopes of a tenant's own key in these tests.
USER_SCOPES = ("submit", "read", "operate")
#: Where screenshots go when CONVEYOR_CONSOLE_SCREENSHOTS names no folder.
SCREENSHOTS_ENV = "CONVEYOR_CONSOLE_SCREENSHOTS"


def chromium_path() -> str:
    """Debian's chromium, or fail saying how to get it."""
    found = os.environ.get("CONVEYOR_CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail(
            "no Chromium for the console's browser tests: apt-get install chromium (Debian's "
            "package; .ci/run installs it), or set CONVEYOR_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    return found


@dataclass(frozen=True)
class Tenant:
    """A tenant's keys: its people's (submit, read, operate) and its workers'."""

    name: str
    user: Key
    worker: Key


@dataclass(frozen=True)
class Stack:
    """A coordinator that requires keys, with an admin key and two tenants."""

    address: str
    admin: str
    acme: Tenant
    globex: Tenant

    def client(self, key: str) -> AsyncClient:
        return AsyncClient(self.address, api_key=key, timeout=10)


class ConsoleProcess(ManagedProcess):
    """``conveyor console`` on a free loopback port."""

    def __init__(self, coordinator: str, log_dir: Path, *extra: str) -> None:
        super().__init__("conveyor-console", log_dir)
        self.port = free_port()
        self.coordinator = coordinator
        self.extra = extra

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        listen = f"127.0.0.1:{self.port}"
        return [*CLI, "console", "--coordinator", self.coordinator, "--listen", listen, *self.extra]

    async def ready(self) -> str:
        """Waits for its banner; returns its output so far."""

        def seen() -> str | None:
            output = self.output()
            if "Press Ctrl-C" in output:
                return output
            assert self.running, f"conveyor console exited ({self.returncode}):\n{output}"
            return None

        result: str = await eventually(seen, timeout=60, what="conveyor console's banner")
        return result


@dataclass
class Person:
    """One browser context (its own cookies) and its page, with what the page did that a
    test may need to see: dialogs opened, console errors and warnings, uncaught
    exceptions, navigations of the main frame."""

    context: BrowserContext
    page: Page
    base: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)

    async def go(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def sign_in(self, key: str) -> None:
        await self.go("/sign-in")
        await self.page.fill("#api_key", key)
        await self.page.click("form[action='/sign-in'] button[type=submit]")
        await self.page.wait_for_url(f"{self.base}/queues")

    async def text(self) -> str:
        return await self.page.inner_text("main")

    async def cookie(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in await self.context.cookies() if c.get("name") == name]
        return dict(found)


@contextlib.asynccontextmanager
async def person(browser: Browser, base: str) -> AsyncIterator[Person]:
    """A new person at the console at ``base``: an isolated browser context."""
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    page = await context.new_page()
    who = Person(context, page, base)

    async def on_dialog(dialog: Dialog) -> None:
        who.dialogs.append(dialog.message)
        await dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            who.errors.append(f"{message.type}: {message.text}")

    def on_navigated(frame: Frame) -> None:
        if frame == page.main_frame:
            who.navigations.append(frame.url)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: who.errors.append(f"pageerror: {exc}"))
    page.on("framenavigated", on_navigated)
    try:
        yield who
    finally:
        await context.close()


class Workers:
    """Workers run in the test's process; :meth:`stop_all` ends them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._running: list[tuple[Worker, asyncio.Task[None]]] = []

    def make(self, key: Key, **options: Any) -> Worker:
        return Worker(self.address, api_key=key.key, grace_period=0.5, **options)

    async def start(self, worker: Worker) -> Worker:
        run = asyncio.create_task(worker.run(install_signal_handlers=False))
        self._running.append((worker, run))
        async with asyncio.timeout(15):
            await worker.wait_connected()
        return worker

    async def stop_all(self) -> None:
        for worker, run in self._running:
            worker.shutdown(force=True)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(run, 10)


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20) -> Any:
    """``eventually`` with a longer default: Chromium on a busy two-core machine."""
    return await eventually(check, timeout=timeout, what=what)


def screenshot_dir(fallback: Path) -> Path:
    """Where the tests save their screenshots: ``$CONVEYOR_CONSOLE_SCREENSHOTS`` (the
    README's come from ``CONVEYOR_CONSOLE_SCREENSHOTS=docs/images``), else ``fallback``."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
