"""Validation refuses what PostgreSQL would refuse, in every field (coordinator/validation.py
and schedule_validation.py); the Hello of the worker protocol is checked in full."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from conveyor.coordinator.api import validation
from conveyor.coordinator.errors import InvalidArgument, ProtocolViolation
from conveyor.coordinator.schedules import validation as schedule_validation
from conveyor.v1 import schedule_pb2, task_pb2, task_service_pb2, worker_service_pb2


def _violations(**fields: Any) -> list[str]:
    request = task_service_pb2.SubmitTaskRequest(**{"type": "t", **fields})
    _, bad = validation.validate_submit(request, max_payload_bytes=1024)
    return [v.field for v in bad]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"content_type": "application/json\x00"}, "content_type"),
        ({"content_type": "text/plain\r\nX-Evil: 1"}, "content_type"),
        ({"idempotency_key": "key\x00"}, "idempotency_key"),
        ({"idempotency_key": "key\n"}, "idempotency_key"),
        ({"traceparent": "00-\x00"}, "traceparent"),
        ({"labels": {"k": "v\x00"}}, "labels['k']"),
        ({"labels": {"k\x00": "v"}}, "labels['k\\x00'] key"),
        ({"queue": "default\n"}, "queue"),
        ({"type": "t\n"}, "type"),
        ({"run_at": timestamp_pb2.Timestamp(seconds=-62_135_596_801)}, "run_at"),
        ({"run_at": timestamp_pb2.Timestamp(seconds=253_402_300_800)}, "run_at"),
        ({"run_at": timestamp_pb2.Timestamp(seconds=1, nanos=-1)}, "run_at"),
        (
            {"retry_policy": task_pb2.RetryPolicy(multiplier=float("nan"))},
            "retry_policy.multiplier",
        ),
        ({"retry_policy": task_pb2.RetryPolicy(jitter=float("inf"))}, "retry_policy.jitter"),
    ],
)
def test_submit_fields_postgresql_would_refuse(fields: dict[str, Any], field: str) -> None:
    assert field in _violations(**fields)


def test_free_text_may_hold_control_characters_but_not_nul() -> None:
    assert _violations(labels={"note": "line one\nline two\ttabbed"}) == []


def test_list_filters_and_page_tokens() -> None:
    for request, field in [
        (task_service_pb2.ListTasksRequest(queue="q\n"), "queue"),
        (task_service_pb2.ListTasksRequest(type="\x00"), "type"),
        (task_service_pb2.ListTasksRequest(page_token="\x00"), "page_token"),
        (task_service_pb2.ListTasksRequest(state=77), "state"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidArgument) as caught:
            validation.validate_list(request)
        assert [v.field for v in caught.value.violations] == [field]
    with pytest.raises(InvalidArgument):
        validation.validate_task_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b\x00")


def test_schedule_firings_keys_are_not_for_clients() -> None:
    """A client's task under a firing's key would block the tick and pass for a firing
    (whose encrypted payload is bound to its schedule)."""
    assert _violations(idempotency_key="schedule:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b:x") == [
        "idempotency_key"
    ]
    assert _violations(idempotency_key="my-schedule:1") == []


def test_a_schedule_id_a_client_chose_must_come_back_as_sent() -> None:
    chosen = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    assert str(schedule_validation.validate_schedule_id(chosen)) == chosen
    assert schedule_validation.validate_schedule_id("") is None
    for bad in (chosen.upper(), chosen.replace("-", ""), "nightly", chosen + "\x00"):
        with pytest.raises(InvalidArgument) as caught:
            schedule_validation.validate_schedule_id(bad)
        assert [v.field for v in caught.value.violations] == ["schedule.id"]


def _schedule(**fields: Any) -> schedule_pb2.Schedule:
    values: dict[str, Any] = {
        "name": "s",
        "cron": "* * * * *",
        "task_template": schedule_pb2.TaskTemplate(type="t"),
        **fields,
    }
    return schedule_pb2.Schedule(**values)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "nightly\n"}, "schedule.name"),
        ({"cron": "* * * * *\x00"}, "schedule.cron"),
        ({"time_zone": "UTC\x00"}, "schedule.time_zone"),
        ({"task_template": schedule_pb2.TaskTemplate(type="t", labels={"a": "\x00"})},
         "schedule.task_template.labels['a']"),
        ({"start_time": timestamp_pb2.Timestamp(seconds=10**12)}, "schedule.start_time"),
    ],
)  # fmt: skip
def test_schedule_fields_postgresql_would_refuse(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        schedule_validation.validate_schedule(
            _schedule(**fields), tenant="t", max_payload_bytes=1024
        )
    assert field in [v.field for v in caught.value.violations]


def test_schedule_names_and_page_tokens_are_matched_in_full() -> None:
    with pytest.raises(InvalidArgument):
        schedule_validation.validate_name("daily\n")
    with pytest.raises(InvalidArgument):
        schedule_validation.validate_list(0, schedule_validation.page_token("bad\x00name"))
    page = schedule_validation.validate_list(0, schedule_validation.page_token("fine"))
    assert page.after_name == "fine"


def _hello(**fields: Any) -> worker_service_pb2.Hello:
    values: dict[str, Any] = {
        "protocol_version": 1,
        "worker_id": "w",
        "task_types": ["a"],
        "credits": 5,
        **fields,
    }
    return worker_service_pb2.Hello(**values)


def test_a_valid_hello_is_normalised() -> None:
    hello = validation.validate_hello(_hello(queues=["q", "q", "r"], hostname="h", pid=3))
    assert hello.queues == ("q", "r")
    assert hello.task_types == ("a",)
    assert validation.validate_hello(_hello()).queues == ("default",)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task_types": []}, "hello.task_types"),
        ({"task_types": ["a b"]}, "hello.task_types[0]"),
        ({"worker_id": ""}, "hello.worker_id"),
        ({"worker_id": "w\x00"}, "hello.worker_id"),
        ({"hostname": "h\x00"}, "hello.hostname"),
        ({"queues": ["default\n"]}, "hello.queues[0]"),
        ({"queues": [""]}, "hello.queues[0]"),
        ({"credits": -1}, "hello.credits"),
        ({"credits": 10**9}, "hello.credits"),
        ({"pid": -4}, "hello.pid"),
    ],
)
def test_a_bad_hello_is_a_protocol_violation_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        validation.validate_hello(_hello(**fields))
    assert field in [v.field for v in caught.value.violations]


def test_hello_encryption_keys_are_checked_and_unset_means_any() -> None:
    assert validation.validate_hello(_hello()).encryption_keys is None
    named = worker_service_pb2.EncryptionKeys(key_ids=["k1", "k2", "k1"])
    keys = validation.validate_hello(_hello(encryption_keys=named)).encryption_keys
    assert keys == frozenset({"k1", "k2"})
    none = worker_service_pb2.EncryptionKeys()
    assert validation.validate_hello(_hello(encryption_keys=none)).encryption_keys == frozenset()
    for bad in (["bad id"], ["k"] * (validation.MAX_KEY_IDS + 1), ["x" * 65]):
        with pytest.raises(ProtocolViolation, match=r"hello\.encryption_keys\.key_ids"):
            validation.validate_hello(
                _hello(encryption_keys=worker_service_pb2.EncryptionKeys(key_ids=bad))
            )


def test_another_protocol_version_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="protocol version 2"):
        validation.validate_hello(_hello(protocol_version=2))


def test_admin_page_tokens_are_checked_before_the_store() -> None:
    from conveyor.coordinator.api.security_admin import _audit_page_token, _key_page_token
    from conveyor.coordinator.errors import FieldViolation

    out: list[FieldViolation] = []
    assert _audit_page_token("", out) is None and _audit_page_token("42", out) == 42
    assert _key_page_token("2026-11-30T00:00:00Z|abcdefghijk2", out) is not None
    assert not out
    for token in ("99999999999999999999", "-1", "0", " 1_0 ", "\u0661\u0662"):
        bad: list[FieldViolation] = []
        assert _audit_page_token(token, bad) is None and bad, token
    for token in ("2026-11-30T00:00:00Z|a\x00", "2026-11-30T00:00:00Z|" + "a" * 10_000, "x|y"):
        bad = []
        assert _key_page_token(token, bad) is None and bad, token
