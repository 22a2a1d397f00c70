"""End-to-end payload encryption: the envelope, the key ring and the codec.

Payloads and results are encrypted in the application (the client, when it submits; the
worker SDK, when it returns a result) and decrypted in the application (the worker SDK,
before the handler runs; the client, when it reads). The coordinator and PostgreSQL only
ever hold envelopes; neither has a key. Temporal's payload codec is the model.

The envelope (version 2), all lengths big-endian::

    magic "\\x00CVE" | version 0x02 | key id length (1 byte) | key id (ASCII) | nonce (12)
    | AES-256-GCM ciphertext of [content type length (2) | content type | data] | tag (16)

- The magic starts with NUL, which no JSON text does, so an envelope is never mistaken
  for a JSON payload; the coordinator sees the content type
  :data:`ENCRYPTED_CONTENT_TYPE`, and the original content type travels inside the
  ciphertext.
- The key id names the key of the :class:`KeyRing` that sealed it, so keys can rotate:
  new envelopes use the ring's primary key, old ones still open with the key they name.
  The coordinator reads it too (:func:`envelope_key_id`, no key needed), to give a task
  only to a worker that holds its key.
- The associated data is the header (magic to nonce) followed by the :class:`Binding`,
  three length-prefixed parts ``kind | task type | subject``; what each kind binds:

  ==========  ================================  =====================================
  kind        what is sealed                    subject
  ==========  ================================  =====================================
  task        a task's payload                  the task id (its ``request_id``, a
                                                UUIDv7 the client makes)
  keyed       the payload of a task submitted   the idempotency key (unique per
              with an idempotency key           tenant; a resubmit seals the same bytes)
  schedule    a schedule's template payload,    the schedule id (the client chooses it
              and so every task it fires        on create); a firing names it in its
                                                idempotency key ``schedule:<id>:<tick>``
  result      a task's result                   the task id
  ==========  ================================  =====================================

  So a task's payload does not open on another task (ids are unique in the cluster,
  idempotency keys within a tenant), under another type, as a template or a result; a
  template does not open on another schedule or on a submitted task; a change to any
  byte, the header included, fails too (:class:`DecryptionError`). The tenant is not
  bound (a client does not know its tenant): a keyed payload could open on a task with
  the same idempotency key in another tenant that holds the same keys, and a template's
  tasks all carry one payload, so one firing's payload opens on another firing of the
  same schedule. Give each tenant its own keys. The coordinator refuses client submits
  with ``schedule:`` keys, so only a firing names a schedule.
- Version 1 envelopes (sealed before this binding existed) still open, with their
  weaker binding: a payload or template only to its task type (a result, as now, to its
  task). Refusing them would dead-letter every task queued at the upgrade and break
  every encrypted schedule; only envelopes sealed before can be moved, nobody without a
  key can make new ones, and the header's version is in the associated data, so a
  version 2 envelope cannot be passed off as version 1. Set the payload of encrypted
  schedules again to move them to version 2; ``EncryptionCodec(legacy=False)`` refuses
  version 1 once nothing sealed before is left.
- The nonce is random, except for a payload submitted with an idempotency key: then it
  is derived (HMAC-SHA256) from the key, the idempotency key, the binding and the
  plaintext, so submitting the same task again gives the same bytes and the coordinator
  recognises the resend instead of refusing a "different" request. Two different
  messages get the same nonce only by a 96-bit collision, as with random nonces.
- With random nonces one key should seal well under 2**32 messages (NIST SP 800-38D):
  rotate keys long before that (``conveyor encryption rotate``).

Errors travel in clear text: an exception message is stored as the attempt's error, so
handlers should not put secrets in them. Labels, types, queues and idempotency keys are
metadata the coordinator needs, and are not encrypted either.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conveyor.transport._errors import ConveyorError

__all__ = [
    "ENCRYPTED_CONTENT_TYPE",
    "SCHEDULE_KEY_PREFIX",
    "Binding",
    "DecryptionError",
    "EncryptionCodec",
    "EncryptionError",
    "KeyRing",
    "KeyRingError",
    "KeyUnavailableError",
    "KeyedCodec",
    "PayloadCodec",
    "envelope_key_id",
    "is_key_id",
    "is_sealed",
    "schedule_of",
]

logger = logging.getLogger("conveyor.transport")

#: The content type the coordinator sees for an encrypted payload.
ENCRYPTED_CONTENT_TYPE = "application/vnd.conveyor.encrypted"

#: How a schedule firing's idempotency key starts: ``schedule:<schedule id>:<tick>``
#: (``coordinator/schedule_firer.py`` writes it; clients may not submit such keys).
SCHEDULE_KEY_PREFIX = "schedule:"

MAGIC = b"\x00CVE"
VERSION = 2
LEGACY_VERSION = 1
"""Envelopes of version 1 bind a payload to its type only; they still open (see above)."""
NONCE_BYTES = 12
KEY_BYTES = 32
_TAG_BYTES = 16
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_FILE_VERSION = 1
# How often a codec made from a key file looks whether the file changed.
_RELOAD_INTERVAL = 1.0


class EncryptionError(ConveyorError):
    """Payload encryption failed or is misconfigured."""


class KeyRingError(EncryptionError, ValueError):
    """A key ring or key file is invalid; the message says what and where."""


class DecryptionError(EncryptionError):
    """A payload or result could not be opened: its key is not in the ring, it was
    altered, or it belongs to another task type or task. Not retryable: another attempt
    would see the same bytes."""


class KeyUnavailableError(DecryptionError):
    """The envelope names a key this ring does not hold. Another process's ring may hold
    it: a worker gives such a task back (``TASK_OUTCOME_KEY_UNAVAILABLE``) instead of
    failing it."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        #: The key id the envelope names.
        self.key_id = key_id


Kind = Literal["task", "keyed", "schedule", "result"]
_PAYLOAD_KINDS = frozenset({"task", "keyed", "schedule"})


@dataclasses.dataclass(frozen=True, slots=True)
class Binding:
    """What a ciphertext is bound to (its associated data; see the module docstring).

    Make one with :meth:`payload` (a task's payload, from what the task says about
    itself), :meth:`schedule` (a schedule's template) or :meth:`result`.
    """

    kind: Kind
    task_type: str
    #: The task id, the idempotency key or the schedule id, by ``kind``.
    subject: str

    @classmethod
    def payload(cls, task_type: str, *, task_id: str = "", idempotency_key: str = "") -> Binding:
        """A task's payload: bound to its schedule when a schedule fired it (its
        idempotency key says so), else to its idempotency key when it has one, else to
        its id.

        Raises:
            ValueError: Neither an id nor an idempotency key.
        """
        schedule_id = schedule_of(idempotency_key)
        if schedule_id is not None:
            return cls("schedule", task_type, schedule_id)
        if idempotency_key:
            return cls("keyed", task_type, idempotency_key)
        if not task_id:
            raise ValueError(
                "an encrypted payload is bound to its task: give the task an id "
                "(request_id) or an idempotency key before sealing it"
            )
        return cls("task", task_type, task_id)

    @classmethod
    def schedule(cls, task_type: str, schedule_id: str) -> Binding:
        """A schedule's template payload (and every task the schedule fires)."""
        return cls("schedule", task_type, schedule_id)

    @classmethod
    def result(cls, task_type: str, task_id: str) -> Binding:
        """A task's result, bound to its task type and task id."""
        return cls("result", task_type, task_id)

    def describe(self) -> str:
        """What the ciphertext is, for error messages."""
        what = {
            "task": f"the payload of task {self.subject}",
            "keyed": f"the payload of the task with idempotency key {self.subject!r}",
            "schedule": f"the payload of schedule {self.subject}",
            "result": f"the result of task {self.subject}",
        }[self.kind]
        return f"{what} (type {self.task_type!r})"

    def associated_data(self, version: int = VERSION) -> bytes:
        """The binding as AES-GCM associated data (each part length-prefixed), as an
        envelope of ``version`` has it."""
        if version == LEGACY_VERSION:
            # Version 1: ("payload", type, "") for payloads and templates alike.
            if self.kind in _PAYLOAD_KINDS:
                parts = ("payload", self.task_type, "")
            else:
                parts = ("result", self.task_type, self.subject)
        else:
            parts = (self.kind, self.task_type, self.subject)
        return b"".join(_framed(part.encode()) for part in parts)


def schedule_of(idempotency_key: str) -> str | None:
    """The schedule id a firing's idempotency key names (``schedule:<id>:<tick>``); None
    for any other key."""
    if not idempotency_key.startswith(SCHEDULE_KEY_PREFIX):
        return None
    schedule_id, colon, _ = idempotency_key[len(SCHEDULE_KEY_PREFIX) :].partition(":")
    return schedule_id if colon and schedule_id else None


def _framed(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is an envelope (starts with the magic bytes)."""
    return data[: len(MAGIC)] == MAGIC


def envelope_key_id(data: bytes) -> str | None:
    """The key id an envelope names, read without any key; None when ``data`` is not a
    well-formed envelope header."""
    if not is_sealed(data) or len(data) < len(MAGIC) + 2:
        return None
    length = data[len(MAGIC) + 1]
    raw = data[len(MAGIC) + 2 : len(MAGIC) + 2 + length]
    try:
        key_id = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return key_id if len(raw) == length and _KEY_ID.fullmatch(key_id) else None


def is_key_id(value: str) -> bool:
    """Whether ``value`` is a well-formed key id (1 to 64 characters of letters, digits and
    ``._:-``, starting with a letter or digit)."""
    return _KEY_ID.fullmatch(value) is not None


def _check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeyRingError(
            f"key id {key_id!r} is invalid: 1 to 64 characters of letters, digits and "
            "'._:-', starting with a letter or digit"
        )
    return key_id


def new_key_id(now: datetime | None = None) -> str:
    """A fresh key id: the date and random hex, e.g. ``k20260315-9f3a1c2e``."""
    return f"k{(now or datetime.now(UTC)):%Y%m%d}-{secrets.token_hex(4)}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    aead: AESGCM
    nonce_key: bytes


def _derive(secret: bytes) -> _Key:
    # Subkeys, so the AES key and the nonce PRF's key are never the same bytes.
    def subkey(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
            secret
        )

    return _Key(AESGCM(subkey(b"conveyor payload aes-256-gcm")), subkey(b"conveyor nonce"))


class KeyRing:
    """Key id -> 256-bit key, one of them primary: the keys one application encrypts with.

    New envelopes use the primary key; any key in the ring opens envelopes that name it.
    Rotating adds a new primary and keeps the old keys, so tasks and results sealed
    before still open. Immutable: :meth:`rotated` returns a new ring.

    Raises:
        KeyRingError: A key id is invalid, a key is not 32 bytes, or the primary is not
            in the ring.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        primary: str,
        *,
        created: Mapping[str, str] | None = None,
    ) -> None:
        if not keys:
            raise KeyRingError("a key ring needs at least one key")
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r} must be {KEY_BYTES} bytes (AES-256)")
        if primary not in keys:
            raise KeyRingError(
                f"the primary key {primary!r} is not in the ring (keys: {', '.join(keys)})"
            )
        self._secrets = dict(keys)
        self._created = dict(created or {})
        self._derived = {key_id: _derive(key) for key_id, key in keys.items()}
        self.primary = primary

    def __repr__(self) -> str:  # never the secrets
        return f"KeyRing(primary={self.primary!r}, keys={self.key_ids!r})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, oldest first."""
        return tuple(self._secrets)

    def created(self, key_id: str) -> str | None:
        """When a key was made (ISO 8601), when the ring recorded it."""
        return self._created.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._secrets

    def _key(self, key_id: str) -> _Key | None:
        return self._derived.get(key_id)

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyRing:
        """A ring with one new random key, primary."""
        key_id = _check_key_id(key_id or new_key_id())
        return cls(
            {key_id: secrets.token_bytes(KEY_BYTES)},
            key_id,
            created={key_id: _now_text()},
        )

    def rotated(self, key_id: str | None = None) -> KeyRing:
        """This ring plus a new random key, which becomes the primary."""
        key_id = _check_key_id(key_id or new_key_id())
        if key_id in self._secrets:
            raise KeyRingError(f"key id {key_id!r} is already in the ring")
        keys = {**self._secrets, key_id: secrets.token_bytes(KEY_BYTES)}
        return KeyRing(keys, key_id, created={**self._created, key_id: _now_text()})

    # -- the key file ----------------------------------------------------------------

    def to_json(self) -> str:
        """The key file's text (it holds the secrets: keep it like a password)."""
        data = {
            "version": _FILE_VERSION,
            "primary": self.primary,
            "keys": [
                {
                    "id": key_id,
                    "key": base64.b64encode(key).decode(),
                    **({"created": self._created[key_id]} if key_id in self._created else {}),
                }
                for key_id, key in self._secrets.items()
            ],
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "the key ring") -> KeyRing:
        """Reads a key file's text (see :meth:`to_json`).

        Raises:
            KeyRingError: The text is not a valid key file; the message names ``source``.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise KeyRingError(f"{source} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != _FILE_VERSION:
            raise KeyRingError(
                f"{source} is not a Conveyor key file (version {_FILE_VERSION}); make one "
                "with conveyor encryption new-key"
            )
        entries = data.get("keys")
        if not isinstance(entries, list) or not entries:
            raise KeyRingError(f"{source} lists no keys")
        keys: dict[str, bytes] = {}
        created: dict[str, str] = {}
        for entry in entries:
            key_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(key_id, str):
                raise KeyRingError(f"{source}: each key needs an 'id' and a 'key'")
            if key_id in keys:
                raise KeyRingError(f"{source}: key id {key_id!r} appears twice")
            try:
                keys[key_id] = base64.b64decode(str(entry.get("key", "")), validate=True)
            except (binascii.Error, ValueError):
                raise KeyRingError(f"{source}: key {key_id!r} is not base64") from None
            if isinstance(entry.get("created"), str):
                created[key_id] = entry["created"]
        primary = data.get("primary")
        if not isinstance(primary, str):
            raise KeyRingError(f"{source} names no primary key")
        try:
            return cls(keys, primary, created=created)
        except KeyRingError as exc:
            raise KeyRingError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Reads a key file.

        Raises:
            KeyRingError: The file is missing, unreadable or invalid.
        """
        where = f"key file {os.fspath(path)!r}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyRingError(
                f"{where} does not exist (conveyor encryption new-key --key-file "
                f"{os.fspath(path)} makes one)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyRingError(f"cannot read {where}: {exc}") from None
        return cls.from_json(text, source=where)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> None:
        """Writes the key file atomically: a new file readable by its owner only (mode
        0600), an existing one keeping its mode (a group that reads it still can).

        Raises:
            KeyRingError: ``overwrite`` is false and the file exists, or it cannot be
                written.
        """
        target = Path(path)
        if not overwrite and target.exists():
            raise KeyRingError(
                f"key file {os.fspath(path)!r} exists already; conveyor encryption rotate "
                "adds a key to it"
            )
        try:
            mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o600
            fd, temp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.")
            try:
                os.fchmod(fd, mode)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(self.to_json())
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, target)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise KeyRingError(f"cannot write key file {os.fspath(path)!r}: {exc}") from None

    # -- sealing ---------------------------------------------------------------------

    def seal(
        self, data: bytes, content_type: str, binding: Binding, *, idempotency_key: str = ""
    ) -> bytes:
        """An envelope of ``data`` and ``content_type`` under the primary key."""
        key = self._derived[self.primary]
        key_id = self.primary.encode("ascii")
        header_start = MAGIC + bytes((VERSION, len(key_id))) + key_id
        plaintext = _framed(content_type.encode()) + data
        aad_tail = binding.associated_data()
        if idempotency_key:
            mac = hmac.new(key.nonce_key, digestmod=hashlib.sha256)
            for part in (idempotency_key.encode(), aad_tail, plaintext):
                mac.update(struct.pack(">Q", len(part)))
                mac.update(part)
            nonce = mac.digest()[:NONCE_BYTES]
        else:
            nonce = os.urandom(NONCE_BYTES)
        header = header_start + nonce
        return header + key.aead.encrypt(nonce, plaintext, header + aad_tail)

    def open(self, data: bytes, binding: Binding, *, legacy: bool = True) -> tuple[bytes, str]:
        """The data and content type an envelope holds; ``legacy`` also opens version 1
        envelopes (bound to their type only).

        Raises:
            KeyUnavailableError: The envelope names a key not in the ring.
            DecryptionError: Not an envelope, a version this SDK does not open, or the
                ciphertext does not open (altered, or bound to another task type, task,
                schedule or kind).
        """
        what = binding.describe()
        if not is_sealed(data):
            raise DecryptionError(f"{what} is not encrypted")
        version = data[len(MAGIC)] if len(data) > len(MAGIC) else None
        if version != VERSION and not (legacy and version == LEGACY_VERSION):
            if version == LEGACY_VERSION:
                raise DecryptionError(
                    f"{what} is an envelope of version 1 (bound to its task type only), "
                    "which this codec refuses (legacy=False): submit it again"
                )
            raise DecryptionError(
                f"{what} is an envelope of version {'?' if version is None else version}, "
                f"which this SDK cannot open (it knows versions 1 and {VERSION}); upgrade "
                "conveyor"
            )
        key_id = envelope_key_id(data)
        start = len(MAGIC) + 2 + data[len(MAGIC) + 1]
        if key_id is None or len(data) < start + NONCE_BYTES + _TAG_BYTES:
            raise DecryptionError(f"{what} is a malformed envelope (cut short or altered)")
        key = self._key(key_id)
        if key is None:
            raise KeyUnavailableError(
                f"{what} was encrypted with key {key_id!r}, which is not in the key ring "
                f"(keys: {', '.join(self.key_ids)}): add that key to the key file; keep "
                "old keys as long as tasks or results sealed with them exist",
                key_id,
            )
        header = data[: start + NONCE_BYTES]
        try:
            plaintext = key.aead.decrypt(
                header[start:],
                data[start + NONCE_BYTES :],
                header + binding.associated_data(version),
            )
        except InvalidTag:
            raise DecryptionError(
                f"{what} does not open with key {key_id!r}: it was altered, or it was "
                f"sealed for another task, schedule, task type or purpose (ciphertexts "
                f"are bound to them)"
            ) from None
        if len(plaintext) < 2:
            raise DecryptionError(f"{what} holds a malformed plaintext")
        (length,) = struct.unpack_from(">H", plaintext)
        content_type = plaintext[2 : 2 + length].decode("utf-8", "replace")
        return plaintext[2 + length :], content_type


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PayloadCodec(Protocol):
    """Turns payloads and results into what travels and is stored, and back.

    The client calls :meth:`encode` on every payload it submits (task and schedule
    template) and :meth:`decode` on payloads and results it reads; the worker SDK calls
    :meth:`decode` on every payload it receives and :meth:`encode` on every result it
    returns. :class:`EncryptionCodec` is the one Conveyor ships.
    """

    def encode(
        self, data: bytes, content_type: str, binding: Binding, *, idempotency_key: str = ""
    ) -> tuple[bytes, str]:
        """``(data, content_type)`` as they are to travel."""
        ...

    def decode(self, data: bytes, content_type: str, binding: Binding) -> tuple[bytes, str]:
        """``(data, content_type)`` as the application sees them.

        Raises:
            KeyUnavailableError: ``data`` needs a key this codec does not hold (a worker
                gives the task back for one that does).
            DecryptionError: ``data`` cannot be decoded; never retryable.
        """
        ...


@runtime_checkable
class KeyedCodec(Protocol):
    """A :class:`PayloadCodec` that can say which keys it opens (as
    :class:`EncryptionCodec` does). A worker with one names them to the coordinator,
    which then gives it only tasks sealed with one of them; a worker with a codec that
    cannot say is given every task, as before."""

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys it opens now (a key file it reads may change them)."""
        ...


class EncryptionCodec:
    """AES-256-GCM end-to-end encryption of payloads and results with a :class:`KeyRing`.

    Give the same key ring (the same key file) to the clients and the workers of an
    application; the coordinator never needs it::

        codec = EncryptionCodec.from_key_file("conveyor-keys.json")
        client = Client("10.0.0.5:50051", codec=codec)
        worker = Worker("10.0.0.5:50051", codec=codec)

    Made from a key file, the codec rereads the file when it changes (it looks at most
    once a second, and at once when it meets a key id it does not hold), so
    ``conveyor encryption rotate`` reaches running clients and workers without a
    restart. A file that no longer reads is logged and the keys read before stay in use.

    Args:
        keys: The key ring.
        allow_plaintext: Accept payloads and results that are not encrypted (while
            turning encryption on with tasks already queued). Off by default: a worker
            then refuses plaintext, which only someone without the keys could have sent.
        legacy: Open version 1 envelopes too, whose payloads are bound to their task
            type only (see the module docstring). On by default, so tasks and schedules
            sealed before the upgrade still run; turn it off once none is left.
    """

    def __init__(
        self, keys: KeyRing, *, allow_plaintext: bool = False, legacy: bool = True
    ) -> None:
        self._ring = keys
        self.allow_plaintext = allow_plaintext
        self.legacy = legacy
        self._path: Path | None = None
        self._version: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        source = f", key_file={os.fspath(self._path)!r}" if self._path else ""
        return f"EncryptionCodec({self._ring!r}{source})"

    @classmethod
    def from_key_file(
        cls, path: str | os.PathLike[str], *, allow_plaintext: bool = False, legacy: bool = True
    ) -> EncryptionCodec:
        """A codec with the keys of ``path``, rereading it when it changes.

        Raises:
            KeyRingError: The file is missing, unreadable or invalid.
        """
        codec = cls(KeyRing.load(path), allow_plaintext=allow_plaintext, legacy=legacy)
        codec._path = Path(path)
        codec._version = _file_version(codec._path)
        codec._checked = time.monotonic()
        return codec

    @property
    def keys(self) -> KeyRing:
        """The key ring in use (reread from the key file if it changed)."""
        self._refresh()
        return self._ring

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys this codec opens (a worker names them in Hello, so it is
        given only tasks it can open; see :class:`KeyedCodec`)."""
        return self.keys.key_ids

    def _refresh(self, *, urgent: bool = False) -> None:
        path = self._path
        if path is None:
            return
        clock = time.monotonic()
        # Urgent (an unknown key id): sooner, but still bounded, so a flood of envelopes
        # naming a foreign key cannot turn into a file read per task.
        if clock - self._checked < (_RELOAD_INTERVAL / 10 if urgent else _RELOAD_INTERVAL):
            return
        with self._lock:
            self._checked = clock
            version = _file_version(path)
            if version == self._version:
                return
            try:
                ring = KeyRing.load(path)
            except KeyRingError as exc:
                logger.warning("%s; still using the keys read before", exc)
                return
            self._version = version
            if ring.key_ids != self._ring.key_ids or ring.primary != self._ring.primary:
                logger.info(
                    "key file %s reread: primary key %s, keys %s",
                    path,
                    ring.primary,
                    ", ".join(ring.key_ids),
                )
            self._ring = ring

    def encode(
        self, data: bytes, content_type: str, binding: Binding, *, idempotency_key: str = ""
    ) -> tuple[bytes, str]:
        """Seals ``data`` under the primary key; see :class:`PayloadCodec`."""
        sealed = self.keys.seal(data, content_type, binding, idempotency_key=idempotency_key)
        return sealed, ENCRYPTED_CONTENT_TYPE

    def decode(self, data: bytes, content_type: str, binding: Binding) -> tuple[bytes, str]:
        """Opens an envelope; see :class:`PayloadCodec`.

        Plaintext passes through only with ``allow_plaintext``. An envelope naming a key
        the ring lacks makes a codec from a key file reread it first.
        """
        if not is_sealed(data):
            if self.allow_plaintext and content_type != ENCRYPTED_CONTENT_TYPE:
                return data, content_type
            raise DecryptionError(
                f"{binding.describe()} is not encrypted, and this codec accepts only "
                "encrypted payloads and results (EncryptionCodec(allow_plaintext=True) "
                "accepts both while encryption is being turned on)"
            )
        ring = self.keys
        key_id = envelope_key_id(data)
        if key_id is not None and key_id not in ring and self._path is not None:
            self._refresh(urgent=True)
            ring = self._ring
        return ring.open(data, binding, legacy=self.legacy)


def _file_version(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
