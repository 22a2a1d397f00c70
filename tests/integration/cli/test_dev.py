"""``conveyor dev`` end to end, as the README's first command: its banner's commands work
as printed, a second one (same data directory, or same port) is refused in one line and
leaves the first running, and Ctrl-C stops everything it started."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import aiohttp
import pytest
from clitools import (
    banner_commands,
    conveyor,
    dev_data_dir,
    dev_process,
    remove_dev_data,
    shell,
)
from processes import free_port
from testsupport import eventually

from conveyor.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


async def test_dev_banner_second_instance_and_ctrl_c() -> None:
    data_dir = dev_data_dir()
    other_dir = dev_data_dir()
    address = f"127.0.0.1:{free_port()}"
    try:
        # From the clone, as the README runs it: the banner's paths are relative to it.
        async with dev_process(data_dir, address, cwd=REPO) as first:
            banner = await first.read_until("Press Ctrl-C")
            assert address in banner
            await _console_link_signs_in_once(banner)

            commands = banner_commands(banner)
            assert len(commands) == 5, commands
            # In one shell, in order, as a user pastes them: the first sets the API key.
            export = commands[0]
            assert export.startswith("export CONVEYOR_API_KEY=cvk_"), export
            key = export.split("=", 1)[1]
            for command in commands[1:]:
                code, out = await shell(f"{export}\n{command}", REPO)
                assert code == 0, f"{command}\n{out}"
            assert "succeeded" in (await shell(f"{export}\n{commands[1]}", REPO))[1]
            # Without the key, the coordinator refuses, in one line saying what to do.
            code, out = await shell(commands[1], REPO)
            assert code == 1 and "API key" in out, out
            # ... and says that in (or under) the dev's folder the key is found by itself.
            assert "folder of a running `conveyor dev`" in out, out
            with_key = {"CONVEYOR_API_KEY": key}

            # A second one on the same data directory: one line, naming the first.
            second = await conveyor(
                "dev", "--listen", address, "--data-dir", str(data_dir), timeout=120
            )
            assert second.code == 1
            assert second.out == ""
            assert second.err == (
                f"conveyor: conveyor dev is already running on {data_dir} "
                f"(pid {first.pid}, listening on {address})\n"
            )
            # Another data directory, the same port: one line, and nothing started.
            third = await conveyor(
                "dev", "--listen", address, "--data-dir", str(other_dir), timeout=120
            )
            assert third.code == 1
            assert third.err == (
                f"conveyor: cannot listen on {address}: the address is in use (another "
                "conveyor dev or coordinator?); pick another with --listen HOST:PORT\n"
            )
            assert "PostgreSQL" not in third.out

            # The first one still answers, its PostgreSQL included.
            done = await conveyor(
                "submit", "echo", '"hi"', "--wait", "--json", "--coordinator", address,
                env=with_key,
            )  # fmt: skip
            assert done.code == 0, done.err
            assert (json.loads(done.out)["state"], json.loads(done.out)["result"]) == (
                "SUCCEEDED",
                "hi",
            )
            done = await conveyor(
                "submit", "fail", "--max-attempts", "1", "--wait", "--coordinator", address,
                "--api-key", key,
            )  # fmt: skip
            assert done.code == 1 and "demo failure" in done.out
            on_dev = ["--coordinator", address, "--api-key", key]

            # Ctrl-C says what it waits for (a running task, here), and a second one stops
            # at once instead of waiting out the 30 s grace period.
            running = await conveyor("submit", "sleep", "600", *on_dev)
            assert running.code == 0, running
            await eventually(lambda: _is_running(running.out.strip(), on_dev), timeout=30)
            first.signal(signal.SIGINT)
            said = await first.read_until("press Ctrl-C again to stop at once")
            assert "running tasks get up to 30 s to finish" in said
            assert await first.interrupt(timeout=25) == 0, first.output()
            # It says what happens to the running task: no "back to their queue" at once.
            assert (
                "stopping at once: running demo tasks are cut off; they run again once their "
                "leases expire" in first.output()
            )
            assert first.output().rstrip().endswith("stopped.")
        assert not EmbeddedPostgres(data_dir / "postgres").is_running()
        assert not (other_dir / "postgres").exists()
    finally:
        remove_dev_data(data_dir)
        remove_dev_data(other_dir)


async def _console_link_signs_in_once(banner: str) -> None:
    """The banner's console address, and its one-time link that signs a browser in."""
    (link,) = re.findall(r"sign in once with (http://\S+)", banner)
    base = link.split("/sign-in", 1)[0]
    assert f"console      {base}/" in banner
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1 too
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        async with http.get(link) as response:
            assert response.status == 200

        async def demo_worker_shown() -> bool | None:
            async with http.get(base + "/workers", allow_redirects=False) as response:
                assert response.status == 200  # signed in, with the admin key
                return True if "echo, sleep, fail" in await response.text() else None

        await eventually(demo_worker_shown, what="the demo worker on the console's page")
        async with http.get(link) as response:
            assert response.status == 400  # once only


async def _is_running(task_id: str, where: list[str]) -> bool | None:
    done = await conveyor("get", task_id, "--json", *where)
    return True if json.loads(done.out)["state"] == "RUNNING" else None
