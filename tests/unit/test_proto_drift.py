"""The committed stubs under proto/conveyor/v1 (and the vendored proto/conveyor/keda) must be
exactly what scripts/gen_protos.sh makes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("v1", "keda")
HINT = "the generated stubs drift from the .proto files: run scripts/gen_protos.sh and commit"


def _stubs(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for pattern in ("*_pb2*.py", "*_pb2*.pyi")
        for p in sorted(folder.glob(pattern))
    }


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    out = tmp_path / "out"
    bindir = str(Path(sys.executable).parent)  # protoc-gen-mypy and protoc-gen-mypy_grpc
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/gen_protos.sh failed:\n{proc.stdout}{proc.stderr}"

    generated = {
        f"{pkg}/{name}": text
        for pkg in PACKAGES
        for name, text in _stubs(out / "conveyor" / pkg).items()
    }
    committed = {
        f"{pkg}/{name}": text
        for pkg in PACKAGES
        for name, text in _stubs(ROOT / "proto" / "conveyor" / pkg).items()
    }
    assert all(any(n.startswith(f"{p}/") for n in generated) for p in PACKAGES), (
        "scripts/gen_protos.sh produced no stubs for some package"
    )

    missing = sorted(generated.keys() - committed.keys())
    stale = sorted(committed.keys() - generated.keys())
    differ = sorted(n for n in generated.keys() & committed.keys() if generated[n] != committed[n])
    problems = []
    if missing:
        problems.append(f"not committed: {', '.join(missing)}")
    if stale:
        problems.append(f"committed but no longer generated: {', '.join(stale)}")
    if differ:
        problems.append(f"differ: {', '.join(differ)}")
    assert not problems, f"{HINT}\n" + "\n".join(problems)
