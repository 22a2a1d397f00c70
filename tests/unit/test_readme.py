"""The README as a new user reads it: its Python blocks pass the project's ruff (lint and
format), and every `conveyor` command line and every --flag it shows exists in the CLI."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.cli.app import GLOBAL_OPTIONS
from conveyor.cli.main import command_tree

ROOT = Path(__file__).resolve().parents[2]
# The README and the pages it sends newcomers to for the secure set-up and operations.
README = "\n".join(
    (ROOT / page).read_text() for page in ("README.md", "docs/security.md", "docs/operations.md")
)
RUFF = Path(sys.executable).parent / "ruff"

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`(conveyor [^`]+)`")
# Flags of the root command (not in command_tree, which lists the runnable commands).
ROOT_FLAGS = {"--help", "--install-completion", "--show-completion"}
# Command lines of other programs (the Operating section's docker and kubectl) have flags
# of their own.
OTHER_PROGRAMS = ("docker ", "kubectl ", "curl ")


def blocks(language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(README) if lang == language]


def shell_commands() -> list[list[str]]:
    """Each `conveyor ...` line of the README's sh blocks, as words (continuations joined)."""
    found = []
    for body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.startswith(("conveyor ", ".venv/bin/conveyor ")):
                found.append(shlex.split(line, comments=True)[1:])
    return found


def resolve(words: list[str]) -> tuple[str, list[str]]:
    """The command path the words name (after global options) and the words after it."""
    tree = command_tree()
    global_flags = {opt.flag for opt in GLOBAL_OPTIONS}
    rest = list(words)
    while rest and rest[0] in global_flags:
        rest = rest[2:] if rest[0] != "--debug" else rest[1:]
    for length in (2, 1):
        path = " ".join(rest[:length])
        if path in tree:
            return path, rest[length:]
    raise AssertionError(f"`conveyor {' '.join(words)}`: no such command")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_pass_ruff(index: int, tmp_path: Path) -> None:
    source = tmp_path / f"readme_{index}.py"
    source.write_text(blocks("python")[index])
    config = ["--config", str(ROOT / "pyproject.toml")]
    for args in (["check", *config], ["format", "--check", "--diff", *config]):
        run = subprocess.run(
            [str(RUFF), *args, str(source)], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, f"README python block {index}:\n{run.stdout}{run.stderr}"


@pytest.mark.slow
def test_shell_commands_exist() -> None:
    commands = shell_commands()
    assert len(commands) >= 8
    tree = command_tree()
    for words in commands:
        path, rest = resolve(words)
        flags = {w.split("=")[0] for w in rest if w.startswith("--")}
        unknown = flags - tree[path].options
        assert not unknown, f"`conveyor {' '.join(words)}`: {path} has no {sorted(unknown)}"


def test_inline_commands_and_every_flag_exist() -> None:
    tree = command_tree()
    every_flag = set().union(*(info.options for info in tree.values()))
    for span in _INLINE.findall(README):
        words = span.replace("\\|", "|").split()[1:]
        if not words or words[0].startswith("-"):
            continue
        groups = {path.split()[0] for path in tree if " " in path}
        names = words[1].split("|") if words[0] in groups and len(words) > 1 else [""]
        for name in names:
            path = f"{words[0]} {name}" if name else words[0]
            assert path in tree, f"`{span}`: no command {path!r}"
    ours = "\n".join(
        line for line in README.splitlines() if not line.lstrip().startswith(OTHER_PROGRAMS)
    )
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", ours))
    unknown = mentioned - every_flag - ROOT_FLAGS
    assert not unknown, f"the README mentions flags no command has: {sorted(unknown)}"


def test_files_the_readme_has_you_create_are_git_ignored() -> None:
    # Issue 20, first hour: `conveyor encryption new-key --key-file conveyor-keys.json`
    # in the clone left a secret for `git add .` to pick up.
    made = set(re.findall(r"--(?:encryption-)?key-file (\S+)", README))
    made |= {re.sub(r"/.*", "/", name) for name in re.findall(r"Save this as\s+`([^`]+)`", README)}
    assert "conveyor-keys.json" in made and "myapp/" in made, made
    ignored = {
        line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }  # fmt: skip
    assert made <= ignored, f"not in .gitignore: {sorted(made - ignored)}"
