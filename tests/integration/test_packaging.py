"""What ships: the wheel holds what a user runs (the CLI, coordinator, worker SDK, client,
the embedded PostgreSQL, the benchmarks) and no test machinery."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What a user runs (spot checks of each part).
MUST_SHIP = {
    "conveyor/cli/main.py",
    "conveyor/coordinator/server.py",
    "conveyor/coordinator/store/migrations/0001_init.sql",
    "conveyor/worker/demo.py",
    "conveyor/client/__init__.py",
    "conveyor/v1/task_service.proto",
    "conveyor/embedded/postgres.py",
    "conveyor/bench/runner.py",  # `conveyor bench` is a user command
    "conveyor/bench/worker.py",  # its worker processes
    "conveyor/console/server.py",  # `conveyor console`, and `conveyor dev`'s console
}
CONSOLE = Path(__file__).resolve().parents[2] / "console"
_TEST_MACHINERY = re.compile(
    r"(^|/)(tests?|testsupport|support)(/|\.py$)|(^|/)(conftest|test_\w+)\.py$"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy without build products: setuptools would pack a stale build/lib (a module
    # deleted from the tree since the last build) along with the sources.
    source = tmp_path_factory.mktemp("source") / "conveyor"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            "build", "dist", ".venv", ".git", "__pycache__", "*.egg-info", ".conveyor"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "-w", str(out), "--no-deps",
         "--no-build-isolation", "-q"],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("conveyor-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_only_the_package_ships(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"conveyor"}
    assert set(names) >= MUST_SHIP, MUST_SHIP - set(names)
    machinery = [name for name in names if _TEST_MACHINERY.search(name)]
    assert not machinery, f"test machinery in the wheel: {machinery}"
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    untyped = {p for p in packages if f"{p}/py.typed" not in names}
    assert not untyped, f"packages without py.typed: {untyped}"


def test_console_script_and_extras(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "conveyor = conveyor.cli.main:main" in wheel.read(entry_points).decode()
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert "Provides-Extra: bench" in text
    assert re.search(r"^Requires-Dist: typer", text, re.MULTILINE)
    # The dev tools are an extra too, never a requirement of the package itself.
    assert not re.search(r"^Requires-Dist: pytest(?!.*extra ==)", text, re.MULTILINE)


def test_the_console_ships_its_templates_and_static_files(wheel: zipfile.ZipFile) -> None:
    # Every file the console serves or renders: nothing is fetched from elsewhere.
    served = {
        "conveyor/console/" + str(path.relative_to(CONSOLE))
        for folder in ("templates", "static")
        for path in (CONSOLE / folder).rglob("*")
        if path.is_file()
    }
    assert {n for n in served if n.endswith((".html", ".js", ".css", ".svg"))}, served
    names = set(wheel.namelist())
    assert served <= names, served - names
    assert "conveyor/console/py.typed" in names


def test_the_etcd_harness_does_not_ship(wheel: zipfile.ZipFile) -> None:
    assert "conveyor/embedded/etcd.py" not in wheel.namelist()
