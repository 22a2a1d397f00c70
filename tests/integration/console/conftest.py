"""Fixtures of the console's browser tests (helpers in tests/support/consoletools.py):

- ``stack`` (function): a coordinator that requires keys, with an admin key and two
  tenants, ``acme`` and ``globex``.
- ``console`` (function): ``conveyor console --coordinator ... --listen 127.0.0.1:PORT``.
- ``browser`` (module): Debian's Chromium with a fresh user-data-dir; each test opens
  isolated contexts in it, one per person signed in (``consoletools.person``).
- ``workers`` (function): workers in the test's process, stopped at its end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from consoletools import (
    CHROMIUM_FLAGS,
    USER_SCOPES,
    ConsoleProcess,
    Stack,
    Tenant,
    Workers,
    chromium_path,
)
from playwright.async_api import Browser, async_playwright
from security import Keys
from testsupport import coordinator_config

from conveyor.coordinator import Coordinator
from conveyor.coordinator.tenancy import keys as api_keys


@pytest.fixture
async def stack(database_dsn: str) -> AsyncIterator[Stack]:
    admin = api_keys.generate()[1]
    coordinator = Coordinator(
        coordinator_config(database_dsn, authentication=True, bootstrap_key=admin)
    )
    await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            keys = Keys(channel, admin)
            tenants = [
                Tenant(
                    name, await keys.create(name, *USER_SCOPES), await keys.create(name, "worker")
                )
                for name in ("acme", "globex")
            ]
        yield Stack(coordinator.address, admin, *tenants)
    finally:
        await coordinator.stop(grace=1.0)


@pytest.fixture
async def console(stack: Stack, tmp_path: Path) -> AsyncIterator[ConsoleProcess]:
    process = ConsoleProcess(stack.address, tmp_path).start()
    try:
        await process.ready()
        yield process
    finally:
        await process.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    profile = tempfile.mkdtemp(prefix="conveyor-test-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS
            )
            try:
                assert context.browser is not None
                yield context.browser
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def workers(stack: Stack) -> AsyncIterator[Workers]:
    made = Workers(stack.address)
    try:
        yield made
    finally:
        await made.stop_all()
