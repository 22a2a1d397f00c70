"""The client's schedule values and their wire conversions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.client import CatchUpPolicy, OverlapPolicy, RetryPolicy, Schedule, TaskState
from conveyor.client._models import TaskTemplate, catch_up_to_proto, overlap_to_proto
from conveyor.v1 import schedule_pb2, task_pb2


def test_schedule_from_proto() -> None:
    msg = schedule_pb2.Schedule(
        name="nightly",
        cron="0 2 * * *",
        time_zone="Europe/Berlin",
        task_template=TaskTemplate(
            type="report", payload={"to": "ops"}, queue="reports", timeout=30, max_attempts=5
        ).to_template(),
        overlap_policy=schedule_pb2.OVERLAP_POLICY_BUFFER_ONE,
        catch_up_policy=schedule_pb2.CATCH_UP_POLICY_FIRE_ALL,
        catch_up_limit=7,
        id="01a2208e-5fda-7a95-8407-142abcd1b8cd",
        etag="3",
    )
    msg.next_fire_times.add().FromDatetime(datetime(2030, 1, 1, 1, tzinfo=UTC))
    firing = msg.recent_firings.add(task_id="t1", task_state=task_pb2.TASK_STATE_SUCCEEDED)
    firing.tick_time.FromDatetime(datetime(2029, 12, 31, 1, tzinfo=UTC))
    schedule = Schedule.from_proto(msg)
    assert (schedule.type, schedule.queue, schedule.json()) == ("report", "reports", {"to": "ops"})
    assert schedule.timeout == timedelta(seconds=30) and schedule.max_attempts == 5
    assert schedule.overlap_policy is OverlapPolicy.BUFFER_ONE
    assert schedule.catch_up_policy is CatchUpPolicy.FIRE_ALL and schedule.catch_up_limit == 7
    assert schedule.next_fire_times == (datetime(2030, 1, 1, 1, tzinfo=UTC),)
    (recent,) = schedule.recent_firings
    assert recent.task_id == "t1" and recent.task_state is TaskState.SUCCEEDED
    assert recent.tick_time == datetime(2029, 12, 31, 1, tzinfo=UTC)
    assert schedule.etag == "3" and schedule.start_time is None


def test_unknown_policy_numbers_read_as_unspecified() -> None:
    msg = schedule_pb2.Schedule(name="x", cron="* * * * *", overlap_policy=99)  # type: ignore[arg-type]
    assert Schedule.from_proto(msg).overlap_policy is OverlapPolicy.UNSPECIFIED


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (None, 0),
        ("skip", schedule_pb2.OVERLAP_POLICY_SKIP),
        ("buffer-one", schedule_pb2.OVERLAP_POLICY_BUFFER_ONE),
        (OverlapPolicy.ALLOW, schedule_pb2.OVERLAP_POLICY_ALLOW),
        ("OVERLAP_POLICY_SKIP", schedule_pb2.OVERLAP_POLICY_SKIP),
    ],
)
def test_overlap_names(value: object, number: int) -> None:
    assert overlap_to_proto(value) == number  # type: ignore[arg-type]


def test_policy_names_are_checked() -> None:
    assert catch_up_to_proto("fire_all") == schedule_pb2.CATCH_UP_POLICY_FIRE_ALL
    with pytest.raises(ValueError, match="unknown CatchUpPolicy 'sometimes'"):
        catch_up_to_proto("sometimes")


def test_task_template_matches_submit_encoding() -> None:
    template = TaskTemplate(
        type="raw", payload=b"\x00\x01", retry_policy=RetryPolicy(multiplier=3)
    ).to_template()
    assert template.payload == b"\x00\x01"
    assert template.content_type == "application/octet-stream"
    assert template.retry_policy.multiplier == 3
    assert TaskTemplate(type="json", payload=[1, 2]).to_template().payload == b"[1,2]"
