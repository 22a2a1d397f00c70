"""``conveyor encryption new-key|rotate|list``: the key file of end-to-end encryption.

The key file holds the application's keys (a :class:`~conveyor.client.KeyRing`): give the
same file to its clients and workers (``--encryption-key-file``, or
``EncryptionCodec.from_key_file``). The coordinator never needs it. Rotating adds a new
primary key and keeps the old ones, so what was encrypted before still decrypts; clients
and workers made from the file reread it when it changes, without a restart.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from conveyor.cli import output
from conveyor.cli.app import Globals, command, make_app
from conveyor.cli.errors import USAGE, CLIError
from conveyor.transport import KeyRing

KeyFile = Annotated[
    str | None,
    typer.Option(
        "--key-file",
        metavar="FILE",
        help="The key file (default: --encryption-key-file, CONVEYOR_ENCRYPTION_KEY_FILE).",
        show_default=False,
    ),
]
KeyId = Annotated[
    str | None,
    typer.Option(
        "--key-id",
        help="Id of the new key (default: k<date>-<random>); it is stored with every "
        "envelope, never secret.",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    """Adds ``conveyor encryption ...`` to ``app``."""
    group = make_app(
        "encryption",
        help="Keys for end-to-end encryption of payloads and results (the coordinator "
        "never sees them).",
    )
    command(
        group,
        "new-key",
        example=[
            "conveyor encryption new-key --key-file conveyor-keys.json",
            "conveyor --encryption-key-file conveyor-keys.json submit send-email "
            '\'{"to": "ada@example.com"}\'',
        ],
    )(new_key)
    command(group, "rotate", example="conveyor encryption rotate --key-file conveyor-keys.json")(
        rotate
    )
    command(group, "list", example="conveyor encryption list --key-file conveyor-keys.json")(
        list_keys
    )
    app.add_typer(group)


def _path(key_file: str | None, g: Globals) -> str:
    path = key_file or g.encryption_key_file
    if not path:
        raise CLIError(
            "name the key file: --key-file FILE (or --encryption-key-file, "
            "CONVEYOR_ENCRYPTION_KEY_FILE)",
            code=USAGE,
        )
    return path


def new_key(key_file: KeyFile = None, key_id: KeyId = None, *, g: Globals) -> int:
    """Create a key file with one new random key (AES-256), readable by you only.

    Give the file to the application's clients and workers (--encryption-key-file); keep
    it like a password. An existing file is never overwritten (rotate adds to it).
    """
    path = _path(key_file, g)
    ring = KeyRing.generate(key_id)
    ring.save(path, overwrite=False)
    output.print_text(f"wrote {path} with key {ring.primary} (primary)")
    return 0


def rotate(key_file: KeyFile = None, key_id: KeyId = None, *, g: Globals) -> int:
    """Add a new random key to the key file and make it the primary key.

    New payloads and results are encrypted with it; the old keys stay in the file and
    still decrypt what they encrypted. Clients and workers reading the file pick the
    change up within a second, without a restart. Copy the file to every machine that
    uses it (workers first: a worker meeting a key it lacks rereads its file, and fails
    the task if the key is still missing).
    """
    path = _path(key_file, g)
    ring = KeyRing.load(path)
    rotated = ring.rotated(key_id)
    rotated.save(path)
    output.print_text(
        f"{path}: new primary key {rotated.primary}; kept {', '.join(ring.key_ids)} to "
        "decrypt what they encrypted"
    )
    return 0


def list_keys(
    key_file: KeyFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    *,
    g: Globals,
) -> int:
    """List the key ids in the key file (never the keys), oldest first, and the primary."""
    ring = KeyRing.load(_path(key_file, g))
    rows = [
        {"id": key_id, "primary": key_id == ring.primary, "created": ring.created(key_id)}
        for key_id in ring.key_ids
    ]
    if as_json:
        output.print_text(json.dumps(rows, indent=2))
        return 0
    output.print_table(
        ["KEY ID", "PRIMARY", "CREATED"],
        [(r["id"], "yes" if r["primary"] else "", r["created"] or "-") for r in rows],
    )
    return 0
