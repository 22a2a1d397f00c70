"""Entry point of the ``conveyor`` command (the console script and ``python -m``)."""

from __future__ import annotations

import difflib
import os
import re
import sys

# gRPC's C core logs a failed TLS handshake (and other connection trouble) at INFO on
# stderr, which would come before the CLI's one-line error; set before gRPC is imported
# (GRPC_VERBOSITY=INFO in the environment brings it back).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import typer

from conveyor.cli import app as cli_app
from conveyor.cli.errors import USAGE


def build() -> typer.Typer:
    """The whole command tree."""
    from conveyor.cli import (
        audit_commands,
        console_command,
        dev,
        encryption_commands,
        keys_commands,
        limits_commands,
        queue_commands,
        schedule_commands,
        services,
        status_command,
        task_commands,
        tenants_commands,
        top_command,
        types_commands,
        webhooks_commands,
    )

    root = cli_app.make_app()
    root.callback(help=cli_app.reflow(cli_app.root_callback.__doc__ or ""))(cli_app.root_callback)
    dev.register(root)
    services.register(root)
    task_commands.register(root)
    queue_commands.register(root)
    schedule_commands.register(root)
    status_command.register(root)
    keys_commands.register(root)
    tenants_commands.register(root)
    limits_commands.register(root)
    audit_commands.register(root)
    top_command.register(root)
    encryption_commands.register(root)
    webhooks_commands.register(root)
    types_commands.register(root)
    console_command.register(root)
    from conveyor.bench import cli as bench_cli

    bench_cli.register(root)
    return root


@dataclass(frozen=True)
class CommandInfo:
    """One runnable command of the tree, for tests and tools that check command lines."""

    path: str
    options: frozenset[str]
    arguments: int
    epilog: str


def command_tree() -> dict[str, CommandInfo]:
    """Every runnable command by its path (``"schedules create"``), with its option flags."""
    found: dict[str, CommandInfo] = {}

    def walk(cmd: Any, path: str) -> None:
        children = getattr(cmd, "commands", None)
        if children:
            for name, child in children.items():
                walk(child, f"{path} {name}".strip())
            return
        options = {
            flag
            for param in cmd.params
            if param.param_type_name == "option"
            for flag in (*param.opts, *param.secondary_opts)
        }
        arguments = sum(1 for param in cmd.params if param.param_type_name == "argument")
        found[path] = CommandInfo(path, frozenset(options), arguments, cmd.epilog or "")

    walk(typer.main.get_command(build()), "")
    return found


#: Words people type for a command that has another name here.
ALIASES = {
    "list": "tasks", "ls": "tasks", "ps": "tasks", "show": "get", "inspect": "get",
    "info": "get", "describe": "get", "redrive": "retry", "requeue": "retry",
    "rerun": "retry", "kill": "cancel", "stop": "cancel", "delete": "purge",
    "add": "submit", "enqueue": "submit", "push": "submit", "send": "submit",
    "run": "submit", "queue": "queues", "schedule": "schedules",
    "cron": "schedules", "key": "keys", "tenant": "tenants", "start": "dev", "serve": "dev",
}  # fmt: skip
_NO_SUCH_COMMAND = re.compile(r"No such command '([^']*)'")


def _usage_message(exc: typer.TyperException) -> str:
    """The usage error's text; for an unknown command, with the nearest command of the
    group it was typed in (a word from other tools, or a near spelling) when one is close."""
    # Typer words a parser's ValueError as pydantic does ("Value error, ..."): the
    # message is the error's text alone.
    message = exc.format_message().replace(": Value error, ", ": ")
    found = _NO_SUCH_COMMAND.search(message)
    ctx = getattr(exc, "ctx", None)
    names = sorted(getattr(getattr(ctx, "command", None), "commands", {}))
    if found is None or not names:
        return message
    typed = found[1].lower()
    alias = ALIASES.get(typed) if ctx is not None and ctx.parent is None else None
    close = [alias] if alias in names else difflib.get_close_matches(typed, names, n=1)
    if not close:
        return message
    # Ours replaces typer's own guess (it would offer `worker` for `workers`).
    return f"{message[: found.end() + 1]} Did you mean '{close[0]}'?"


def _flags_show_no_type(command: Any) -> None:
    """A flag takes no value, so its help shows none (typer would print ``<bool>``)."""
    stack = [command]
    while stack:
        cmd = stack.pop()
        ctx = typer.Context(cmd, help_option_names=["-h", "--help"])
        for param in cmd.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        stack.extend(getattr(cmd, "commands", {}).values())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``conveyor`` command line; returns the exit code."""
    command = typer.main.get_command(build())
    _flags_show_no_type(command)
    try:
        result = command.main(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="conveyor",
            standalone_mode=False,
        )
    except typer.TyperException as exc:  # a usage error (bad flag, missing argument, ...)
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or "conveyor"
        message = _usage_message(exc)
        print(f"{where}: {message} (see {where} --help)", file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", USAGE))
    except typer.Abort:
        return 130
    except SystemExit as exc:
        # rich and typer end a write to a closed stdout (`conveyor --help | head -1`) with
        # exit 1, after pointing stdout at /dev/null; a reader that stopped reading is no
        # failure of ours.
        if exc.code == 1 and _stdout_discarded():
            return 0
        raise
    return result if isinstance(result, int) else 0


def _stdout_discarded() -> bool:
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
