"""Entry point of the ``conveyor`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from conveyor.cli import logs, schedule_commands, services, status_command, task_commands
from conveyor.cli.errors import CLIError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Conveyor: a gRPC-first task queue on PostgreSQL."
    )
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("CONVEYOR_COORDINATOR", "127.0.0.1:50051"),
        metavar="HOST:PORT[,HOST:PORT]",
        help="coordinator address(es) (env CONVEYOR_COORDINATOR)",
    )
    parser.add_argument("--rpc-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--log-level", default=os.environ.get("CONVEYOR_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    services.add_parsers(sub)
    task_commands.add_parsers(sub)
    schedule_commands.add_parsers(sub)
    status_command.add_parser(sub)
    from conveyor.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from conveyor.bench import schedules as bench_schedules

    bench_schedules.add_parser(sub)
    from conveyor.bench import failover as bench_failover

    bench_failover.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        code: int = args.run(args)
    except CLIError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from conveyor.client import ConveyorError

        if isinstance(exc, ConveyorError | OSError):
            print(f"conveyor: {exc}", file=sys.stderr)
            return 1
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
