"""``conveyor keys generate|create|list|revoke``: API keys from the shell.

Through the AdminService (an admin key in ``--api-key`` or ``CONVEYOR_API_KEY``), or with
``--dsn`` straight against the database: that is how the first admin key of a cluster is
made (the schema is created first if the database is empty), and it works while no
coordinator runs. Running coordinators learn a change within a second either way.

``keys create`` prints the key alone on stdout (``KEY=$(conveyor keys create ...)``) and
what it is on stderr: the key is shown this once and never stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.cli.wire import admin_call

T = TypeVar("T")

DSN_HELP = (
    "Work on this PostgreSQL database directly instead of through a coordinator (how the "
    "first admin key is made); env CONVEYOR_DSN."
)

Dsn = Annotated[
    str | None, typer.Option("--dsn", envvar="CONVEYOR_DSN", metavar="DSN", help=DSN_HELP)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    """Adds ``conveyor keys ...`` to ``app``."""
    group = make_app("keys", help="API keys: who may call the cluster, for which tenant.")
    command(
        group,
        "generate",
        example="export CONVEYOR_BOOTSTRAP_KEY=$(conveyor keys generate)",
    )(generate)
    command(
        group,
        "create",
        example=[
            "conveyor keys create --tenant acme --scope submit --scope read",
            "conveyor keys create --dsn \"$DSN\" --tenant ops --scope admin --description 'first'",
            "conveyor keys create --tenant acme --scope worker --expires-in 90d",
        ],
    )(create)
    command(
        group, "list", example=["conveyor keys list", "conveyor keys list --tenant acme --all"]
    )(list_)
    command(group, "revoke", example="conveyor keys revoke 7xq2mrk4bd2a")(revoke)
    app.add_typer(group)


#: The longest --expires-in: beyond it a date overflows (and a key should not outlive it).
MAX_EXPIRES_IN = timedelta(days=36525)


def _check_tenant(tenant: str) -> None:
    from conveyor.coordinator.api.validation import name_problem

    problem = name_problem(tenant)
    if problem is not None:
        raise CLIError(f"--tenant {tenant!r} {problem}", code=USAGE)


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``1h30m``... (the CLI's one duration syntax) as a timedelta;
    CLIError otherwise."""
    from conveyor.cli.values import DURATION_EXAMPLES, duration_seconds

    try:
        seconds = duration_seconds(text)
    except typer.BadParameter:
        raise CLIError(f"--expires-in {text!r} is not {DURATION_EXAMPLES}", code=USAGE) from None
    if seconds <= 0:
        raise CLIError(f"--expires-in {text!r} must be more than nothing", code=USAGE)
    if seconds > MAX_EXPIRES_IN.total_seconds():
        raise CLIError(f"--expires-in {text!r} is more than 100 years", code=USAGE)
    return timedelta(seconds=seconds)


def scopes_text(scopes: Any) -> str:
    from conveyor.coordinator.tenancy import keys as api_keys

    return ",".join(api_keys.scope_name(s) for s in scopes)


def state_text(state: int) -> str:
    from conveyor.v1 import auth_pb2

    return auth_pb2.ApiKeyState.Name(state).removeprefix("API_KEY_STATE_").lower()  # type: ignore[arg-type]


def on_database(dsn: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """``work(connection)`` on ``dsn``'s database, its schema created or updated first."""
    import asyncpg

    from conveyor.coordinator.store.migrator import migrate

    async def main() -> T:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise CLIError(f"cannot connect to the database ({why})") from None
        try:
            await migrate(conn)
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def _key_row(key: Any) -> list[object]:
    expire = key.expire_time.ToDatetime(tzinfo=UTC) if key.HasField("expire_time") else None
    return [
        key.id,
        key.tenant,
        scopes_text(key.scopes),
        state_text(key.state),
        output.when(key.create_time.ToDatetime(tzinfo=UTC)),
        output.when(expire) if expire else "never",
        key.description,
    ]


def _key_json(key: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    data = json_format.MessageToDict(key, preserving_proto_field_name=True)
    data["scopes"] = scopes_text(key.scopes).split(",")
    data["state"] = state_text(key.state)
    return data


# -- commands ------------------------------------------------------------------------------


def generate(*, g: Globals) -> int:
    """Print a new random API key, and nothing else: for CONVEYOR_BOOTSTRAP_KEY or
    --bootstrap-key-file, which a coordinator adds as an admin key at start. Nothing is
    stored; the key works once a coordinator was started with it."""
    from conveyor.coordinator.tenancy import keys as api_keys

    output.print_text(api_keys.generate()[1])
    return 0


def create(
    tenant: Annotated[
        str, typer.Option("--tenant", help="The tenant the key acts for.", show_default=False)
    ],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="A scope: submit, read, operate, worker or admin; repeat for several (or "
            "separate them with commas).",
            show_default=False,
        ),
    ],
    description: Annotated[str, typer.Option("--description", help="What the key is for.")] = "",
    expires_in: Annotated[
        str | None,
        typer.Option("--expires-in", metavar="DURATION", help="Lifetime: 90d, 12h, 30m, ..."),
    ] = None,
    dsn: Dsn = None,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """Create an API key; print it (on stdout, alone) once.

    Keep it secret: the cluster keeps only its hash. Send it as --api-key, CONVEYOR_API_KEY
    or the client's api_key=.
    """
    from conveyor.coordinator.api.security_admin import MAX_DESCRIPTION_LENGTH
    from conveyor.coordinator.api.validation import check_text
    from conveyor.coordinator.errors import FieldViolation
    from conveyor.coordinator.tenancy import keys as api_keys

    names = [s.strip() for given in scope for s in given.split(",") if s.strip()]
    try:
        scopes = api_keys.normalize_scopes(names)
    except ValueError as exc:
        raise CLIError(f"--scope: {exc}", code=USAGE) from None
    if not scopes:
        raise CLIError("name at least one --scope (submit, read, operate, worker, admin)", USAGE)
    _check_tenant(tenant)
    # Checked here as the API checks it: with --dsn nothing else would before PostgreSQL.
    out: list[FieldViolation] = []
    check_text(description, "description", out, max_length=MAX_DESCRIPTION_LENGTH, identifier=False)
    if out:
        raise CLIError(f"--description {out[0].description}", code=USAGE)
    expire_time = None
    if expires_in is not None:
        expire_time = datetime.now(UTC) + parse_duration(expires_in)
    if dsn:
        message, secret = _create_in_database(dsn, tenant, scopes, description, expire_time)
    else:
        message, secret = _create_through_api(g, tenant, scopes, description, expire_time)
    if as_json:
        output.print_text(output.to_json({**_key_json(message), "key": secret}))
        return 0
    expiry = f", expires {output.when(expire_time)}" if expire_time else ""
    output.console(stderr=True).print(
        f"created API key {message.id} for tenant {tenant} (scopes {','.join(scopes)}{expiry}); "
        "it is shown only now:",
        markup=False,
    )
    output.print_text(secret)
    return 0


def _create_through_api(
    g: Globals, tenant: str, scopes: tuple[str, ...], description: str, expire: datetime | None
) -> tuple[Any, str]:
    from google.protobuf import timestamp_pb2

    from conveyor.coordinator.tenancy import keys as api_keys
    from conveyor.v1 import admin_service_pb2

    request = admin_service_pb2.CreateApiKeyRequest(
        tenant=tenant, scopes=[api_keys.scope_value(s) for s in scopes], description=description
    )
    if expire is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(expire)
        request.expire_time.CopyFrom(stamp)

    async def call(admin: Any) -> Any:
        return await admin.CreateApiKey(request)

    response = admin_call(g, call)
    return response.key, response.secret


def _create_in_database(
    dsn: str, tenant: str, scopes: tuple[str, ...], description: str, expire: datetime | None
) -> tuple[Any, str]:
    from conveyor.coordinator.api.security_admin import api_key_message
    from conveyor.coordinator.tenancy.bootstrap import create_key_in_database

    async def work(conn: Any) -> tuple[Any, str]:
        row, key = await create_key_in_database(
            conn, tenant=tenant, scopes=scopes, description=description, expire_time=expire
        )
        return api_key_message(row), key

    return on_database(dsn, work)


def list_(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also revoked and expired keys.")] = False,
    dsn: Dsn = None,
    as_json: AsJson = False,
    *,
    g: Globals,
) -> int:
    """List API keys (never their secrets), newest first."""
    if tenant is not None:
        _check_tenant(tenant)
    if dsn:
        keys = _list_in_database(dsn, tenant, show_all)
    else:
        keys = _list_through_api(g, tenant, show_all)
    if as_json:
        output.print_text(output.to_json({"keys": [_key_json(k) for k in keys]}))
        return 0
    headers = ["ID", "TENANT", "SCOPES", "STATE", "CREATED", "EXPIRES", "DESCRIPTION"]
    output.print_table(headers, [_key_row(k) for k in keys])
    return 0


def _list_through_api(g: Globals, tenant: str | None, show_all: bool) -> list[Any]:
    from conveyor.v1 import admin_service_pb2

    async def call(admin: Any) -> list[Any]:
        # Every page on one channel.
        keys: list[Any] = []
        token = ""
        while True:
            request = admin_service_pb2.ListApiKeysRequest(
                tenant=tenant or "", show_inactive=show_all, page_size=1000, page_token=token
            )
            page = await admin.ListApiKeys(request)
            keys.extend(page.keys)
            token = page.next_page_token
            if not token:
                return keys

    result: list[Any] = admin_call(g, call)
    return result


def _list_in_database(dsn: str, tenant: str | None, show_all: bool) -> list[Any]:
    from conveyor.coordinator.api.security_admin import api_key_message
    from conveyor.coordinator.store import api_keys as store

    async def work(conn: Any) -> list[Any]:
        rows = await store.list_page(
            conn, tenant=tenant, show_inactive=show_all, after=None, limit=1_000_000
        )
        return [api_key_message(r) for r in rows]

    return on_database(dsn, work)


def revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (keys list shows it).")],
    dsn: Dsn = None,
    *,
    g: Globals,
) -> int:
    """Revoke an API key: calls with it fail, and its open streams end, on every coordinator
    within a second. Revoking a revoked key changes nothing."""
    from conveyor.coordinator.api.security_admin import validate_key_id
    from conveyor.coordinator.errors import InvalidArgument
    from conveyor.coordinator.tenancy import keys as api_keys

    if key_id.startswith(api_keys.KEY_PREFIX):
        # A whole key was pasted: take its id, and never echo the secret.
        parsed = api_keys.parse(key_id)
        if parsed is None:
            raise CLIError("that is not a key id nor a whole key; keys list shows ids", USAGE)
        key_id = parsed
    try:
        validate_key_id(key_id)
    except InvalidArgument:
        raise CLIError(f"{key_id!r} is not an API key id (keys list shows them)", USAGE) from None
    if dsn:
        key = _revoke_in_database(dsn, key_id)
    else:
        from conveyor.v1 import admin_service_pb2

        async def call(admin: Any) -> Any:
            request = admin_service_pb2.RevokeApiKeyRequest(id=key_id)
            return (await admin.RevokeApiKey(request)).key

        key = admin_call(g, call)
    output.print_text(f"revoked API key {key.id} (tenant {key.tenant})")
    return 0


def _revoke_in_database(dsn: str, key_id: str) -> Any:
    from conveyor.coordinator.api.security_admin import api_key_message
    from conveyor.coordinator.tenancy.bootstrap import revoke_key_in_database

    async def work(conn: Any) -> Any:
        row = await revoke_key_in_database(conn, key_id)
        if row is None:
            raise CLIError(f"no API key has the id {key_id} (conveyor keys list shows them)")
        return api_key_message(row)

    return on_database(dsn, work)
