"""The console's queue view shows a count that reached ListQueues' cap as "at least"
(docs/performance.md, issue 19, seventh round), in a real browser, live."""

from __future__ import annotations

import re

import pytest
from consoletools import ConsoleProcess, Stack, person
from playwright.async_api import Browser

from conveyor.client import TaskSpec
from conveyor.coordinator.api import queue_ops

pytestmark = pytest.mark.slow


async def test_a_capped_count_shows_as_at_least(
    stack: Stack, console: ConsoleProcess, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator runs in this process: a cap of 3 stands for 10,000 at depth.
    monkeypatch.setattr(queue_ops, "DEFAULT_COUNT_LIMIT", 3)
    async with stack.client(stack.acme.user.key) as client:
        await client.submit_many([TaskSpec(type="t", payload=None, queue="deep")] * 5)
        await client.submit_many([TaskSpec(type="t", payload=None, queue="shallow")] * 2)

    async with person(browser, console.url) as ops:
        await ops.sign_in(stack.acme.user.key)
        await ops.go("/queues")
        await ops.page.wait_for_selector("[data-source=stream]")  # a live update rendered it
        deep = ops.page.locator("tr[data-queue=deep]")
        # pending 3+, running 0, scheduled 0, dead 0; its oldest "at least" some age ago
        assert re.search(r"^deep\s+3\+\s+0\s+0\s+0\s+at least .+ ago", await deep.inner_text())
        cell = deep.locator("td").nth(1)
        assert await cell.get_attribute("title") == "at least 3: counted up to that many"
        shallow = ops.page.locator("tr[data-queue=shallow]")
        text = await shallow.inner_text()
        assert re.search(r"^shallow\s+2\s+0\s+0\s+0\s+\S", text) and "at least" not in text
        assert await shallow.locator("td").nth(1).get_attribute("title") is None
        assert ops.errors == [] and ops.dialogs == []
