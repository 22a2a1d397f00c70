"""The wheel, built as the Dockerfile builds it, installs into a clean virtualenv and starts.

Containers cannot run on these machines, so this follows the Dockerfile's build stage on
the host: the build context as .dockerignore leaves it, ``pip wheel --no-deps`` of it, a
fresh venv with that wheel installed, then ``conveyor --help`` and a real coordinator
from that venv against the test PostgreSQL, up until gRPC health says SERVING.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cluster import serving
from processes import Command, free_port
from testsupport import eventually

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the context.

    Enough of Docker's matching for the patterns this repository uses: names and globs
    from the root, and ``**/`` prefixes.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatch(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def build_context(dest: Path) -> None:
    """The files ``COPY . .`` sees: the work tree (tracked and new files) less
    .dockerignore."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    for path in listed:
        source = ROOT / path
        if _ignored(path, patterns) or not source.is_file():
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def run(*command: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def test_dockerignore_matching() -> None:
    patterns = [".git", "tests", "**/__pycache__", "*.egg-info"]
    assert _ignored("tests/unit/x.py", patterns)
    assert _ignored("coordinator/__pycache__/a.pyc", patterns)
    assert _ignored("conveyor.egg-info/PKG-INFO", patterns)
    assert not _ignored("coordinator/server.py", patterns)
    assert not _ignored("observability/tests.py", patterns)


# A clean venv installs every dependency from the package index: about a minute alone,
# past the default 120 s on a machine busy with other work.
@pytest.mark.timeout(400)
async def test_the_wheel_built_like_the_image_installs_and_runs(
    tmp_path: Path, database_dsn: str
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The steps below are the build stage's; fail if the Dockerfile stops doing them.
    assert "COPY . ." in dockerfile
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /dist ." in dockerfile
    assert "/opt/conveyor/bin/pip install --no-cache-dir /dist/conveyor-*.whl" in dockerfile

    context, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    build_context(context)
    assert not (context / "tests").exists() and (context / "pyproject.toml").exists()
    await asyncio.to_thread(
        run, sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, ".",
        cwd=context,
    )  # fmt: skip
    (wheel,) = dist.glob("conveyor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "conveyor/observability/metrics.py" in names
    assert "conveyor/observability/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]

    await asyncio.to_thread(run, sys.executable, "-m", "venv", venv)
    # --no-compile: the image compiles its site-packages at install; here that is ~15 s of
    # CPU on a shared test machine for nothing the test checks (modules it imports compile
    # when imported).
    await asyncio.to_thread(run, venv / "bin" / "pip", "install", "-q", "--no-compile", wheel)
    conveyor = venv / "bin" / "conveyor"
    assert "coordinator" in await asyncio.to_thread(run, conveyor, "--help", timeout=60)
    await asyncio.to_thread(
        run, venv / "bin" / "python", "-c",
        "import conveyor.observability.metrics, conveyor.observability.tracing",
    )  # fmt: skip

    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))}
    coordinator = Command(
        "coordinator",
        [conveyor, "coordinator", "--dsn", database_dsn, "--listen", address],
        tmp_path,
        env,
        cwd=tmp_path,
        inherit_env=False,
    ).start()
    try:

        async def up() -> bool:
            assert coordinator.running, f"coordinator exited: {coordinator.log_tail()}"
            return await serving(address, timeout=2)

        await eventually(up, timeout=60, what="the coordinator to serve")
        coordinator.signal(signal.SIGTERM)
        assert await coordinator.wait_exit(30) == 0, coordinator.log_tail()
    finally:
        coordinator.close()
