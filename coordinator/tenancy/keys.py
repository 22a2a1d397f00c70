"""API keys and scopes, pure: the key format, its hash, and which scope each RPC needs.

A key is ``cvk_<id>_<secret>``: ``id`` is 12 lowercase base32 characters (60 random bits),
the public lookup prefix that names the key in lists and in the audit log; ``secret`` is
43 base64url characters (256 random bits). Only the SHA-256 of the whole key is stored.
A secret that random needs no password hash (no dictionary to try, no salt to add), and
the comparison is constant-time (:func:`secret_matches`).

The scope each RPC needs is the ``conveyor.v1.required_scope`` option in the protos
(``proto/conveyor/v1/auth.proto``): :func:`required_scopes` reads it off the service
descriptors, so the table cannot drift from the API and a method without it fails loudly
at start (and in a unit test).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import importlib
import pkgutil
import re
import secrets
from collections.abc import Iterable, Mapping

import conveyor.v1
from conveyor.v1 import auth_pb2

KEY_PREFIX = "cvk_"
ID_LENGTH = 12
SECRET_BYTES = 32
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_KEY = re.compile(r"cvk_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")
# Anything longer cannot be a key: checked before the regex so a huge header costs nothing.
MAX_KEY_LENGTH = len(KEY_PREFIX) + ID_LENGTH + 1 + 43

SUBMIT = "submit"
READ = "read"
OPERATE = "operate"
WORKER = "worker"
ADMIN = "admin"
ALL_SCOPES = (SUBMIT, READ, OPERATE, WORKER, ADMIN)
"""Every scope, in the order they are shown."""

_BY_VALUE: dict[auth_pb2.Scope.ValueType, str] = {
    auth_pb2.SCOPE_SUBMIT: SUBMIT,
    auth_pb2.SCOPE_READ: READ,
    auth_pb2.SCOPE_OPERATE: OPERATE,
    auth_pb2.SCOPE_WORKER: WORKER,
    auth_pb2.SCOPE_ADMIN: ADMIN,
}
_BY_NAME = {name: value for value, name in _BY_VALUE.items()}


def generate() -> tuple[str, str]:
    """A new key: ``(id, whole key)``."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def parse(token: str) -> str | None:
    """The id of a well-formed key, else None (nothing else is extracted from ``token``)."""
    if len(token) != MAX_KEY_LENGTH:
        return None
    match = _KEY.fullmatch(token)
    return match.group(1) if match else None


def secret_hash(key: str) -> bytes:
    """What is stored of a key: the SHA-256 of the whole key."""
    return hashlib.sha256(key.encode()).digest()


def secret_matches(key: str, stored_hash: bytes) -> bool:
    """Whether ``key`` is the key whose hash is ``stored_hash``, in constant time."""
    return hmac.compare_digest(secret_hash(key), stored_hash)


def looks_like_key(text: str) -> bool:
    """Whether ``text`` holds something shaped like a key (for a key in the wrong place)."""
    return KEY_PREFIX in text


# -- scopes ----------------------------------------------------------------------------------


def scope_name(value: int) -> str:
    """``submit`` for SCOPE_SUBMIT; ValueError for UNSPECIFIED or an unknown number."""
    try:
        return _BY_VALUE[value]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"not a scope: {value}") from None


def scope_value(name: str) -> auth_pb2.Scope.ValueType:
    """SCOPE_SUBMIT for ``submit``; ValueError naming the scopes for anything else."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(ALL_SCOPES)
        raise ValueError(f"unknown scope {name!r}; the scopes are {known}") from None


def normalize_scopes(names: Iterable[str]) -> tuple[str, ...]:
    """Scope names deduplicated, in :data:`ALL_SCOPES` order; ValueError for unknown ones."""
    given = set(names)
    for name in given:
        scope_value(name)
    return tuple(s for s in ALL_SCOPES if s in given)


def _api_modules() -> list[object]:
    package = conveyor.v1
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.endswith("_pb2")
    ]


@functools.cache
def required_scopes() -> Mapping[str, str]:
    """The scope each ``conveyor.v1`` RPC needs, by full method path
    (``/conveyor.v1.TaskService/SubmitTask``): from the ``required_scope`` option.

    Raises:
        RuntimeError: A method names no scope (the protos must name one for each).
    """
    table: dict[str, str] = {}
    missing: list[str] = []
    for module in _api_modules():
        descriptor = getattr(module, "DESCRIPTOR", None)
        if descriptor is None:
            continue
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                value = method.GetOptions().Extensions[auth_pb2.required_scope]
                if value == auth_pb2.SCOPE_UNSPECIFIED:
                    missing.append(path)
                else:
                    table[path] = scope_name(value)
    if missing:
        raise RuntimeError(
            "these RPCs name no scope; add `option (required_scope) = SCOPE_...;` to each in "
            f"proto/conveyor/v1: {', '.join(sorted(missing))}"
        )
    return table


@functools.cache
def streaming_methods() -> frozenset[str]:
    """The full paths of the ``conveyor.v1`` methods that stream (either way)."""
    return frozenset(path for path, kind in _method_kinds().items() if any(kind))


@functools.cache
def client_streaming_methods() -> frozenset[str]:
    """The full paths of the ``conveyor.v1`` methods whose client streams requests."""
    return frozenset(path for path, (client, _) in _method_kinds().items() if client)


def _method_kinds() -> dict[str, tuple[bool, bool]]:
    return {
        f"/{service.full_name}/{method.name}": (method.client_streaming, method.server_streaming)
        for module in _api_modules()
        if getattr(module, "DESCRIPTOR", None) is not None
        for service in module.DESCRIPTOR.services_by_name.values()  # type: ignore[attr-defined]
        for method in service.methods
    }
