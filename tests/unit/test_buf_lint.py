"""`buf lint` (STANDARD rules, buf.yaml at the root) passes on proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def find_buf() -> str:
    """The buf binary of the buf-bin package: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "buf"
    if beside.is_file():
        return str(beside)
    found = shutil.which("buf")
    assert found, "buf not found: install the dev extras (pip install -e '.[dev]', buf-bin)"
    return found


def test_buf_lint() -> None:
    proc = subprocess.run(
        [find_buf(), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"buf lint failed:\n{proc.stdout}{proc.stderr}"
