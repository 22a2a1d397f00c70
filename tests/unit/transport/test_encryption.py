"""The encryption envelope: round trips, the key id it names, tamper detection, the
binding to task type, task (id or idempotency key), schedule and purpose, version 1
envelopes, rotation, and the key file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conveyor.transport import _encryption
from conveyor.transport._encryption import (
    ENCRYPTED_CONTENT_TYPE,
    MAGIC,
    NONCE_BYTES,
    Binding,
    DecryptionError,
    EncryptionCodec,
    KeyRing,
    KeyRingError,
    KeyUnavailableError,
    _framed,
    envelope_key_id,
    is_sealed,
    schedule_of,
)

SECRET = b'{"card": "4111 1111 1111 1111"}'
TASK_ID = "0190f4a2-7b1c-7d3e-8f00-0123456789ab"
PAYLOAD = Binding.payload("charge", task_id=TASK_ID)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate("k1")


def test_round_trip_keeps_data_and_content_type(ring: KeyRing) -> None:
    codec = EncryptionCodec(ring)
    sealed, content_type = codec.encode(SECRET, "application/json", PAYLOAD)
    assert content_type == ENCRYPTED_CONTENT_TYPE  # all the coordinator learns
    assert is_sealed(sealed) and sealed.startswith(MAGIC)
    assert SECRET not in sealed and b"application/json" not in sealed
    assert envelope_key_id(sealed) == "k1"
    assert codec.decode(sealed, content_type, PAYLOAD) == (SECRET, "application/json")
    # Empty data and long content types survive too.
    empty, _ = codec.encode(b"", "x/" + "y" * 300, PAYLOAD)
    assert codec.decode(empty, ENCRYPTED_CONTENT_TYPE, PAYLOAD) == (b"", "x/" + "y" * 300)


def test_no_json_text_looks_like_an_envelope() -> None:
    for text in (b"null", b'"x"', b"{}", b"[]", b"1", b" {}", b""):
        assert not is_sealed(text)


def test_every_altered_byte_is_detected(ring: KeyRing) -> None:
    sealed = ring.seal(SECRET, "application/json", PAYLOAD)
    for index in range(len(MAGIC), len(sealed)):
        altered = bytearray(sealed)
        altered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            ring.open(bytes(altered), PAYLOAD)
    with pytest.raises(DecryptionError, match="malformed envelope"):
        ring.open(sealed[: len(MAGIC) + 4 + NONCE_BYTES], PAYLOAD)
    with pytest.raises(DecryptionError, match="does not open with key 'k1': it was altered"):
        ring.open(sealed[:-1], PAYLOAD)


def test_unknown_version_says_upgrade(ring: KeyRing) -> None:
    sealed = bytearray(ring.seal(SECRET, "application/json", PAYLOAD))
    sealed[len(MAGIC)] = 9
    with pytest.raises(DecryptionError, match="version 9, which this SDK cannot open"):
        ring.open(bytes(sealed), PAYLOAD)


def test_ciphertext_is_bound_to_type_task_and_purpose(ring: KeyRing) -> None:
    """A ciphertext cannot be replayed as another task's payload, another type's, a
    schedule's, another task's result, or a result (an echo handler would otherwise hand
    back any payload as a result)."""
    payload = ring.seal(SECRET, "application/json", PAYLOAD)
    others = (
        Binding.payload("refund", task_id=TASK_ID),
        Binding.payload("charge", task_id=TASK_ID.replace("ab", "ac")),
        Binding.payload("charge", task_id=TASK_ID, idempotency_key=TASK_ID),
        Binding.schedule("charge", TASK_ID),
        Binding.result("charge", TASK_ID),
    )
    for other in others:
        with pytest.raises(DecryptionError, match="sealed for another task, schedule, task"):
            ring.open(payload, other)
    result = ring.seal(b'"ok"', "application/json", Binding.result("charge", "t1"))
    assert ring.open(result, Binding.result("charge", "t1"))[0] == b'"ok"'
    for other in (Binding.result("charge", "t2"), Binding.payload("charge", task_id="t1")):
        with pytest.raises(DecryptionError):
            ring.open(result, other)
    # The parts are framed: moving a character from the type to the task id differs too.
    framed = ring.seal(b"x", "", Binding.result("ab", "c"))
    with pytest.raises(DecryptionError):
        ring.open(framed, Binding.result("a", "bc"))


def test_a_payload_is_bound_to_what_names_its_task() -> None:
    """Its schedule when a schedule fired it, else its idempotency key (a resubmit with a
    new request id is the same request), else its id; never to nothing."""
    schedule_id = "0190f4a2-0000-7000-8000-00000000000a"
    fired = Binding.payload("t", task_id=TASK_ID, idempotency_key=f"schedule:{schedule_id}:x")
    assert fired == Binding.schedule("t", schedule_id)
    assert Binding.payload("t", task_id=TASK_ID, idempotency_key="order-1").subject == "order-1"
    assert Binding.payload("t", task_id=TASK_ID) == Binding("task", "t", TASK_ID)
    with pytest.raises(ValueError, match="bound to its task"):
        Binding.payload("t")
    assert schedule_of("schedule:") is None and schedule_of("order-1") is None


def test_the_schedule_firers_keys_name_their_schedule() -> None:
    """The worker and the client read the schedule id from a firing's idempotency key,
    in the format the coordinator writes."""
    from datetime import UTC, datetime
    from uuid import UUID

    from conveyor.coordinator.schedules.firer import idempotency_key

    schedule_id = UUID("0190f4a2-0000-7000-8000-00000000000a")
    key = idempotency_key(schedule_id, datetime(2026, 3, 15, 12, 0, tzinfo=UTC))
    assert schedule_of(key) == str(schedule_id)


def _legacy_seal(ring: KeyRing, data: bytes, task_type: str) -> bytes:
    """An envelope as version 1 sealed a payload: bound to its type only."""
    key_id = ring.primary.encode()
    header = MAGIC + bytes((1, len(key_id))) + key_id + bytes(NONCE_BYTES)
    aad = header + _framed(b"payload") + _framed(task_type.encode()) + _framed(b"")
    plaintext = _framed(b"application/json") + data
    return header + ring._derived[ring.primary].aead.encrypt(bytes(NONCE_BYTES), plaintext, aad)


def test_version_1_payloads_still_open_with_their_type_binding(ring: KeyRing) -> None:
    old = _legacy_seal(ring, SECRET, "charge")
    # Opens on any task of its type (what version 1 bound), under any new binding...
    for binding in (PAYLOAD, Binding.payload("charge", task_id="x", idempotency_key="k")):
        assert ring.open(old, binding) == (SECRET, "application/json")
    assert EncryptionCodec(ring).decode(old, ENCRYPTED_CONTENT_TYPE, PAYLOAD)[0] == SECRET
    # ... never as another type or as a result, and not at all when refused.
    for other in (Binding.payload("refund", task_id="x"), Binding.result("charge", "x")):
        with pytest.raises(DecryptionError):
            ring.open(old, other)
    with pytest.raises(DecryptionError, match=r"version 1 .* which this codec refuses"):
        EncryptionCodec(ring, legacy=False).decode(old, ENCRYPTED_CONTENT_TYPE, PAYLOAD)
    # A version 2 envelope relabelled as version 1 does not open as one: the version is
    # in the associated data.
    new = bytearray(ring.seal(SECRET, "application/json", PAYLOAD))
    assert new[len(MAGIC)] == 2
    new[len(MAGIC)] = 1
    with pytest.raises(DecryptionError, match="does not open"):
        ring.open(bytes(new), PAYLOAD)


def test_idempotent_submits_seal_to_the_same_bytes(ring: KeyRing) -> None:
    """A resend with the same idempotency key must be the same request, byte for byte."""
    first = ring.seal(SECRET, "application/json", PAYLOAD, idempotency_key="order-1")
    again = ring.seal(SECRET, "application/json", PAYLOAD, idempotency_key="order-1")
    assert first == again
    assert ring.seal(SECRET, "application/json", PAYLOAD, idempotency_key="order-2") != first
    assert ring.seal(b"other", "application/json", PAYLOAD, idempotency_key="order-1") != first
    # Without a key every envelope differs (a random nonce).
    assert ring.seal(SECRET, "application/json", PAYLOAD) != ring.seal(
        SECRET, "application/json", PAYLOAD
    )


def test_rotation_keeps_old_keys_decrypting(ring: KeyRing) -> None:
    old = ring.seal(SECRET, "application/json", PAYLOAD)
    rotated = ring.rotated("k2")
    assert rotated.primary == "k2" and rotated.key_ids == ("k1", "k2")
    new = rotated.seal(SECRET, "application/json", PAYLOAD)
    assert envelope_key_id(new) == "k2"
    assert rotated.open(old, PAYLOAD)[0] == SECRET
    with pytest.raises(
        KeyUnavailableError, match=r"key 'k2', which is not in the key ring \(keys: k1\)"
    ) as missing:
        ring.open(new, PAYLOAD)
    assert missing.value.key_id == "k2"
    with pytest.raises(KeyRingError, match="already in the ring"):
        rotated.rotated("k1")


def test_plaintext_passes_only_when_allowed(ring: KeyRing) -> None:
    strict = EncryptionCodec(ring)
    with pytest.raises(DecryptionError, match="is not encrypted, and this codec accepts only"):
        strict.decode(b'"plain"', "application/json", PAYLOAD)
    lenient = EncryptionCodec(ring, allow_plaintext=True)
    assert lenient.decode(b'"plain"', "application/json", PAYLOAD) == (
        b'"plain"',
        "application/json",
    )
    # Claiming to be encrypted without an envelope is no plaintext.
    with pytest.raises(DecryptionError):
        lenient.decode(b'"plain"', ENCRYPTED_CONTENT_TYPE, PAYLOAD)


def test_key_ring_checks_its_keys() -> None:
    with pytest.raises(KeyRingError, match="32 bytes"):
        KeyRing({"k": b"short"}, "k")
    with pytest.raises(KeyRingError, match="primary key 'x' is not in the ring"):
        KeyRing({"k": bytes(32)}, "x")
    with pytest.raises(KeyRingError, match="key id 'bad id' is invalid"):
        KeyRing({"bad id": bytes(32)}, "bad id")
    ring = KeyRing({"k": b"\x01" * 32}, "k")
    assert "\\x01" not in repr(ring) and "AQEB" not in repr(ring)  # no secrets in logs


def test_key_file_round_trip_is_private(ring: KeyRing, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring.rotated("k2").save(path, overwrite=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = KeyRing.load(path)
    assert (loaded.primary, loaded.key_ids) == ("k2", ("k1", "k2"))
    sealed = ring.seal(SECRET, "t", PAYLOAD)
    assert loaded.open(sealed, PAYLOAD)[0] == SECRET
    with pytest.raises(KeyRingError, match="exists already"):
        ring.save(path, overwrite=False)
    path.chmod(0o640)  # shared with a service's group: a rotation keeps that
    loaded.rotated("k3").save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


_KEY = "A" * 43 + "="  # 32 zero bytes in base64


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("not json", "is not JSON"),
        ({"version": 7}, "is not a Conveyor key file"),
        ({"version": 1, "keys": []}, "lists no keys"),
        ({"version": 1, "primary": "a", "keys": [{"id": "a", "key": "%%%"}]}, "not base64"),
        ({"version": 1, "primary": "a", "keys": [{"id": "a", "key": "AAAA"}]}, "32 bytes"),
        (
            {"version": 1, "primary": "a", "keys": [{"id": "a", "key": _KEY}] * 2},
            "appears twice",
        ),
        ({"version": 1, "keys": [{"id": "a", "key": _KEY}]}, "no primary"),
    ],
)
def test_bad_key_files_are_named(data: object, error: str, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(KeyRingError, match=error) as raised:
        KeyRing.load(path)
    assert str(path) in str(raised.value)


def test_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match=r"does not exist .*conveyor encryption new-key"):
        EncryptionCodec.from_key_file(tmp_path / "none.json")


def test_codec_rereads_its_key_file(
    ring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation on disk reaches a running codec: new primary for encoding, and a key it
    did not hold yet for decoding; a broken file keeps the keys read before."""
    monkeypatch.setattr(_encryption, "_RELOAD_INTERVAL", 0.0)
    path = tmp_path / "keys.json"
    ring.save(path)
    codec = EncryptionCodec.from_key_file(path)
    rotated = ring.rotated("k2")
    rotated.save(path)
    from_elsewhere = rotated.seal(SECRET, "t", PAYLOAD)
    assert codec.decode(from_elsewhere, ENCRYPTED_CONTENT_TYPE, PAYLOAD) == (SECRET, "t")
    assert envelope_key_id(codec.encode(SECRET, "t", PAYLOAD)[0]) == "k2"

    path.write_text(json.dumps({"version": 1}))
    assert codec.keys.key_ids == ("k1", "k2")  # kept
