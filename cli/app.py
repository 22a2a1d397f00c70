"""The ``conveyor`` command tree (typer) and its global options.

Global options (``--coordinator``, ``--api-key``, ``--rpc-timeout``, ``--log-level``,
``--log-format``, ``--debug``) are accepted before the command, as click expects, and
after it, as people write them (``conveyor worker --demo --coordinator X``):
:func:`command` adds them to every command's own options, where a value given there wins
over one given before the command, which wins over the environment and the default. A
new global option (TLS, later) is one entry in :data:`GLOBAL_OPTIONS` and one field of
:class:`Globals`.

Every command is registered with :func:`command`, which also turns expected failures
into one line on stderr (``conveyor: ...``) and a closed stdout (``| head``) into a quiet
exit 0; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

if TYPE_CHECKING:  # imported when a command connects: `conveyor --help` stays quick
    from conveyor.client import AsyncClient, Client
    from conveyor.client._channel import Connection
    from conveyor.transport import ConnectionOptions

from conveyor.cli import values
from conveyor.cli.errors import describe
from conveyor.observability import logs

DEFAULT_COORDINATOR = "127.0.0.1:50051"
GLOBAL_PANEL = "Global options (before or after the command)"

F = TypeVar("F", bound=Callable[..., Any])


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


@dataclass(frozen=True)
class Globals:
    """The global options as one command sees them."""

    coordinator: str = DEFAULT_COORDINATOR
    api_key: str | None = None
    rpc_timeout: float = 10.0
    log_level: LogLevel = LogLevel.info
    log_format: LogFormat = LogFormat.text
    debug: bool = False
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    encryption_key_file: str | None = None

    @property
    def tls_use(self) -> str:
        """How this command dials: plaintext, TLS, or TLS with a client certificate."""
        from conveyor.cli import security
        from conveyor.transport import _tls_hints as hints

        if not security.uses_tls(self):
            return hints.PLAINTEXT
        return hints.MUTUAL_TLS if self.tls_cert else hints.SERVER_TLS

    @property
    def addresses(self) -> list[str]:
        """``--coordinator`` split into its addresses."""
        return [a.strip() for a in self.coordinator.split(",") if a.strip()]

    def options(self) -> ConnectionOptions:
        """How every command reaches the coordinator (credentials, keys, metadata): the
        one place the global options that shape a connection are applied; the client
        library, the worker and the CLI's own calls all open their channels from it."""
        from conveyor.cli import security
        from conveyor.transport import ConnectionOptions

        options = ConnectionOptions(
            credentials=security.channel_credentials(self), api_key=self.api_key or None
        )
        # --api-key and CONVEYOR_API_KEY (read into api_key) win over a local conveyor dev's.
        return ConnectionOptions.merge(options, addresses=self.addresses)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """The client library's connection layer to the coordinators (failover, the
        resends it allows, the API key), for the calls the client's methods do not make;
        closed when the block ends."""
        from conveyor.client._channel import Connection, RetryRules

        conn = Connection(
            self.addresses, timeout=self.rpc_timeout, options=self.options(), rules=RetryRules()
        )
        try:
            yield conn
        finally:
            await conn.close()

    def client(self) -> Client:
        """A synchronous client for the command (close it, or ``with``)."""
        from conveyor.cli import security
        from conveyor.client import Client

        return Client(
            self.addresses,
            timeout=self.rpc_timeout,
            options=self.options(),
            codec=security.payload_codec(self),
        )

    def async_client(self) -> AsyncClient:
        """An asyncio client for the command (``async with``)."""
        from conveyor.cli import security
        from conveyor.client import AsyncClient

        return AsyncClient(
            self.addresses,
            timeout=self.rpc_timeout,
            options=self.options(),
            codec=security.payload_codec(self),
        )


@dataclass(frozen=True)
class _GlobalOption:
    field: str
    flag: str
    annotation: Any
    help: str
    envvar: str | None = None
    metavar: str | None = None
    parser: Callable[[str], Any] | None = None
    """Parses and checks the text (``cli/values.py``); None: typer's own for the type."""


GLOBAL_OPTIONS = (
    _GlobalOption(
        "coordinator",
        "--coordinator",
        str,
        "Coordinator address(es), comma-separated; tried in order.",
        envvar="CONVEYOR_COORDINATOR",
        metavar="HOST:PORT[,HOST:PORT]",
    ),
    _GlobalOption(
        "api_key",
        "--api-key",
        str,
        "API key (cvk_...) sent with every call; conveyor keys create makes one.",
        envvar="CONVEYOR_API_KEY",
        metavar="KEY",
    ),
    _GlobalOption(
        "rpc_timeout",
        "--rpc-timeout",
        float,
        "Seconds each call to the coordinator may take.",
        metavar="DURATION",
        parser=values.seconds(),
    ),
    _GlobalOption("log_level", "--log-level", LogLevel, "Log level.", envvar="CONVEYOR_LOG_LEVEL"),
    _GlobalOption("log_format", "--log-format", LogFormat, "Log format."),
    _GlobalOption(
        "debug",
        "--debug",
        bool,
        "Show the traceback of an error, not just its one line.",
        envvar="CONVEYOR_DEBUG",
    ),
    # TLS and payload encryption: what they mean is in cli/security.py.
    _GlobalOption(
        "tls",
        "--tls",
        bool,
        "Reach the coordinator over TLS, trusting the system's CAs (implied by --tls-ca).",
        envvar="CONVEYOR_TLS",
    ),
    _GlobalOption(
        "tls_ca",
        "--tls-ca",
        str,
        "PEM certificates to trust for the coordinator's TLS certificate (implies --tls).",
        envvar="CONVEYOR_TLS_CA",
        metavar="FILE",
    ),
    _GlobalOption(
        "tls_cert",
        "--tls-cert",
        str,
        "PEM certificate of this process: the coordinator's server certificate, a client's "
        "or worker's certificate for mutual TLS.",
        envvar="CONVEYOR_TLS_CERT",
        metavar="FILE",
    ),
    _GlobalOption(
        "tls_key",
        "--tls-key",
        str,
        "PEM private key of --tls-cert.",
        envvar="CONVEYOR_TLS_KEY",
        metavar="FILE",
    ),
    _GlobalOption(
        "encryption_key_file",
        "--encryption-key-file",
        str,
        "Key ring for end-to-end payload encryption (conveyor encryption new-key makes one).",
        envvar="CONVEYOR_ENCRYPTION_KEY_FILE",
        metavar="FILE",
    ),
)

# The options given before the command (the root callback stores them here); a command's
# own copies of the options override them. One CLI invocation per process.
_before_command = Globals()


def _option(opt: _GlobalOption, *, root: bool) -> Any:
    """The typer option (``Annotated`` metadata) of a global option."""
    return typer.Option(
        opt.flag,
        help=opt.help,
        # Only the root reads the environment: a command-level option means "given here".
        envvar=opt.envvar if root else None,
        metavar=opt.metavar,
        parser=opt.parser,
        rich_help_panel=GLOBAL_PANEL,
        show_default=root,
        case_sensitive=False,
    )


ROOT_HELP = (
    "Conveyor: a gRPC-first task queue on PostgreSQL.\n\n"
    "Start with [bold]conveyor dev[/bold] (PostgreSQL, a coordinator and a demo worker on "
    "this machine), then [bold]conveyor submit echo '\"hello\"' --wait[/bold] in another "
    "shell."
)


def root_callback(**values: Any) -> None:
    """The root command: keeps the global options given before the command."""
    global _before_command
    _before_command = Globals(**values)


# The root's parameters are the global options, with the environment and the defaults.
_root_parameters = [
    inspect.Parameter(
        opt.field,
        inspect.Parameter.KEYWORD_ONLY,
        default=getattr(Globals(), opt.field),
        annotation=Annotated[opt.annotation, _option(opt, root=True)],
    )
    for opt in GLOBAL_OPTIONS
]
root_callback.__signature__ = inspect.Signature(_root_parameters)  # type: ignore[attr-defined]
root_callback.__annotations__ = {p.name: p.annotation for p in _root_parameters}
# typer shows the callback's docstring as the root's help.
root_callback.__doc__ = ROOT_HELP


def make_app(name: str | None = None, help: str | None = None) -> typer.Typer:
    """A typer app (the root or a command group) with the CLI's common settings."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=name is None,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
    )


def command(
    app: typer.Typer, name: str, *, example: str | list[str], help: str | None = None
) -> Callable[[F], F]:
    """Registers ``fn`` as ``conveyor ... name``, with the global options and error handling.

    ``fn`` takes its own typer parameters plus ``g: Globals`` (keyword-only), and returns
    the exit code. ``example`` lines are shown at the end of ``--help``.
    """
    examples = [example] if isinstance(example, str) else example

    def register(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "g"]
        extra = [
            inspect.Parameter(
                f"_global_{opt.field}",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[opt.annotation | None, _option(opt, root=False)],
            )
            for opt in GLOBAL_OPTIONS
        ]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> int:
            given = {
                opt.field: kwargs.pop(f"_global_{opt.field}")
                for opt in GLOBAL_OPTIONS
                if kwargs.get(f"_global_{opt.field}") is not None
            }
            for opt in GLOBAL_OPTIONS:
                kwargs.pop(f"_global_{opt.field}", None)
            g = dataclasses.replace(_before_command, **given)
            return _run(fn, g, args, kwargs)

        # typer reads the parameters off the signature: the command's own, then the
        # global ones, all keyword arguments to `run`.
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own, *extra], return_annotation=int
        )
        # typer also reads type hints; give it the evaluated ones (fn's are strings that
        # name things in fn's module, which this module cannot resolve).
        run.__annotations__ = {p.name: p.annotation for p in (*own, *extra)} | {"return": int}
        del run.__wrapped__  # typer must see `run`'s signature, not fn's
        epilog = "[bold]Example" + ("s" if len(examples) > 1 else "") + ":[/bold]\n\n"
        epilog += "\n\n".join(f"  {escape(line)}" for line in examples)
        app.command(name, help=reflow(help or fn.__doc__ or ""), epilog=epilog)(run)
        return fn

    return register


def reflow(doc: str) -> str:
    """A docstring as help text: each paragraph on one line (rich mode keeps line breaks,
    so the source's would show up mid-sentence)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _run(fn: Callable[..., Any], g: Globals, args: Any, kwargs: dict[str, Any]) -> int:
    logs.configure(g.log_level.value, g.log_format.value)
    try:
        code = fn(*args, g=g, **kwargs)
    except BrokenPipeError:
        _quiet_stdout()
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        described = describe(exc, g.tls_use)
        if described is None:
            raise  # not an expected failure: a bug, worth its traceback
        message, exit_code = described
        if g.debug:
            traceback.print_exc()
        with contextlib.suppress(BrokenPipeError):
            print(f"conveyor: {message}", file=sys.stderr, flush=True)
        raise typer.Exit(exit_code) from None
    return int(code or 0)


def _quiet_stdout() -> None:
    """After the reader of stdout went away (``| head``): send the rest nowhere.

    Python flushes stdout once more at exit, which would raise and print a second error.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
