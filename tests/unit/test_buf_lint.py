"""`buf lint` (STANDARD rules, buf.yaml at the root) passes on proto/."""

from __future__ import annotations

import subprocess
from pathlib import Path

from processes import venv_tool

ROOT = Path(__file__).resolve().parents[2]


def test_buf_lint() -> None:
    proc = subprocess.run(
        [venv_tool("buf", "buf-bin"), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"buf lint failed:\n{proc.stdout}{proc.stderr}"
