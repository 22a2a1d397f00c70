"""Writes the blocking :class:`Client`'s methods from :class:`AsyncClient`'s.

Run ``python -m conveyor.client._codegen`` after changing a public method of
``AsyncClient``; ``--check`` only reports whether ``_sync_client.py`` is current (a test
runs it). Everything in ``_sync_client.py`` below the marker line is generated: for each
public ``async def`` of ``AsyncClient`` (``close`` and the context manager excepted, which
are written by hand above the marker) a method with the same signature, defaults and
docstring that runs the coroutine on the client's loop thread; async generators become
iterators. So the two clients cannot drift apart.

A development tool: it needs ``ruff`` (a dev dependency) to format what it writes.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

__all__ = ["MARKER", "generate"]

MARKER = (
    "    # -- generated from AsyncClient by `python -m conveyor.client._codegen`; "
    "do not edit below --"
)
# Written by hand in the sync client, above the marker.
_HAND_WRITTEN = frozenset({"close"})

_HERE = Path(__file__).parent
ASYNC_PATH = _HERE / "_async_client.py"
SYNC_PATH = _HERE / "_sync_client.py"


def generate(async_source: str, sync_source: str) -> str:
    """The sync client's source: ``sync_source`` up to the marker, then the methods.

    Raises:
        ValueError: ``sync_source`` has no marker line, or ``AsyncClient`` is missing.
    """
    head, found, _ = sync_source.partition(MARKER + "\n")
    if not found:
        raise ValueError(f"the sync client has no marker line {MARKER.strip()!r}")
    tree = ast.parse(async_source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AsyncClient"]
    if not classes:
        raise ValueError("no class AsyncClient in the async client's source")
    methods = [
        _method(node, async_source)
        for node in classes[0].body
        if isinstance(node, ast.AsyncFunctionDef)
        and not node.name.startswith("_")
        and node.name not in _HAND_WRITTEN
    ]
    return _format(head + MARKER + "\n" + "\n".join(methods))


def _method(node: ast.AsyncFunctionDef, source: str) -> str:
    returns = node.returns
    iterate = False
    if (
        isinstance(returns, ast.Subscript)
        and isinstance(returns.value, ast.Name)
        and returns.value.id == "AsyncGenerator"
    ):
        iterate = True
        item = returns.slice.elts[0] if isinstance(returns.slice, ast.Tuple) else returns.slice
        annotation = f"Iterator[{ast.unparse(item)}]"
    else:
        annotation = ast.unparse(returns) if returns is not None else "None"
    docstring = ""
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        segment = ast.get_source_segment(source, first)
        if isinstance(first.value.value, str) and segment:
            docstring = f"        {segment}\n"
    call = f"self._async.{node.name}({_call_arguments(node.args)})"
    if iterate:
        body = f"return self._loop.iterate({call})"
    elif annotation == "None":
        body = f"self._loop.run({call})"
    else:
        body = f"return self._loop.run({call})"
    return (
        f"    def {node.name}({ast.unparse(node.args)}) -> {annotation}:\n"
        f"{docstring}"
        f"        {body}\n"
    )


def _call_arguments(args: ast.arguments) -> str:
    positional = [a.arg for a in [*args.posonlyargs, *args.args] if a.arg != "self"]
    parts = list(positional)
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    parts += [f"{a.arg}={a.arg}" for a in args.kwonlyargs]
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return ", ".join(parts)


def _format(source: str) -> str:
    command = [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(SYNC_PATH), "-"]
    try:
        done = subprocess.run(command, input=source, capture_output=True, text=True, check=False)
    except OSError as exc:  # pragma: no cover - no interpreter to run
        raise RuntimeError(f"cannot run ruff to format the sync client: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"ruff could not format the generated sync client (is the dev extra installed?): "
            f"{done.stderr.strip()}"
        )
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    """Rewrites ``_sync_client.py``, or with ``--check`` says whether it is current."""
    parser = argparse.ArgumentParser(prog="python -m conveyor.client._codegen")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    current = SYNC_PATH.read_text(encoding="utf-8")
    wanted = generate(ASYNC_PATH.read_text(encoding="utf-8"), current)
    if current == wanted:
        return 0
    if args.check:
        print(f"{SYNC_PATH} is stale: run python -m conveyor.client._codegen", file=sys.stderr)
        return 1
    SYNC_PATH.write_text(wanted, encoding="utf-8")
    print(f"wrote {SYNC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
