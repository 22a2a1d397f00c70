"""Checks schedule requests and turns them into rows to write, or field violations.

Like ``validation`` for tasks: nothing reaches the store unless it passed here, so a bad
request writes nothing. The task template is checked by ``validation.validate_submit``
itself, so a template is valid exactly when a SubmitTask with the same fields would be.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from conveyor.coordinator import config as defaults
from conveyor.coordinator.api.validation import (
    NewTask,
    check_page_size,
    check_text,
    check_timestamp,
    name_problem,
    validate_submit,
)
from conveyor.coordinator.errors import FieldViolation, InvalidArgument
from conveyor.coordinator.schedules.cron import (
    CATCH_UP_FIRE_ONCE,
    OVERLAP_ALLOW,
    CronError,
    CronSpec,
    compile_cron,
)
from conveyor.coordinator.store.schedules import ScheduleRow
from conveyor.v1 import schedule_pb2, task_service_pb2

DEFAULT_TIME_ZONE = "UTC"
DEFAULT_CATCH_UP_LIMIT = 100
MAX_CATCH_UP_LIMIT = 10_000
MAX_CRON_LENGTH = 256
MAX_TIME_ZONE_LENGTH = 64

# UpdateSchedule's mask: the fields a client may change (name, paused and the output-only
# fields may not), and the template's fields, which may also be named one by one.
UPDATABLE = (
    "cron",
    "time_zone",
    "task_template",
    "overlap_policy",
    "catch_up_policy",
    "catch_up_limit",
    "start_time",
    "end_time",
)
TEMPLATE_FIELDS = tuple(f.name for f in schedule_pb2.TaskTemplate.DESCRIPTOR.fields)
# Changing these restarts the schedule from now.
TIMING = frozenset({"cron", "time_zone", "start_time", "end_time"})


@dataclass(frozen=True)
class ValidSchedule:
    """A validated schedule, ready to write."""

    row: ScheduleRow
    spec: CronSpec
    paused: bool


def check_name(value: str, field: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(field, "must not be empty"))
        return
    problem = name_problem(value)
    if problem is not None:
        out.append(FieldViolation(field, problem))


def validate_name(value: str, field: str = "name") -> str:
    out: list[FieldViolation] = []
    check_name(value, field, out)
    if out:
        raise InvalidArgument(out)
    return value


def validate_schedule_id(value: str, field: str = "schedule.id") -> uuid.UUID | None:
    """The id a client chose for a new schedule (None: the coordinator makes one).

    The Python client chooses it when it encrypts the template, which is bound to it, so
    it must come back as sent: canonical text (lowercase, hyphenated) only.
    """
    if not value:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value:
        raise InvalidArgument(
            [FieldViolation(field, "must be a UUID in canonical form (lowercase, hyphenated)")]
        )
    return parsed


def template_request(template: schedule_pb2.TaskTemplate) -> task_service_pb2.SubmitTaskRequest:
    """The SubmitTaskRequest a template stands for (without key and run_at)."""
    request = task_service_pb2.SubmitTaskRequest(
        queue=template.queue,
        type=template.type,
        payload=template.payload,
        priority=template.priority,
        max_attempts=template.max_attempts,
        content_type=template.content_type,
        labels=dict(template.labels),
    )
    if template.HasField("timeout"):
        request.timeout.CopyFrom(template.timeout)
    if template.HasField("retry_policy"):
        request.retry_policy.CopyFrom(template.retry_policy)
    return request


def template_task(template: bytes) -> NewTask:
    """The task a stored (so already validated) template submits, without key or hash."""
    request = template_request(schedule_pb2.TaskTemplate.FromString(template))
    task, violations = validate_submit(request, max_payload_bytes=len(request.payload))
    if task is None:
        raise ValueError(f"a stored task template is invalid: {violations}")
    return task


def _timestamp(msg: Any, name: str, field: str, out: list[FieldViolation]) -> datetime | None:
    if not msg.HasField(name):
        return None
    return check_timestamp(getattr(msg, name), field, out)


def _check_cron(cron: str, field: str, out: list[FieldViolation]) -> bool:
    before = len(out)
    check_text(cron, field, out, max_length=MAX_CRON_LENGTH)
    if len(out) > before:
        return False
    if not cron.strip():
        out.append(FieldViolation(field, "must not be empty"))
        return False
    try:
        compile_cron(cron.strip(), DEFAULT_TIME_ZONE)
    except CronError as exc:
        out.append(FieldViolation(field, f"{cron!r} {exc}"))
        return False
    return True


def _check_time_zone(time_zone: str, field: str, out: list[FieldViolation]) -> bool:
    before = len(out)
    check_text(time_zone, field, out, max_length=MAX_TIME_ZONE_LENGTH)
    if len(out) > before:
        return False
    try:
        compile_cron("0 0 * * *", time_zone)
    except CronError as exc:
        out.append(FieldViolation(field, str(exc)))
        return False
    return True


def validate_schedule(
    msg: schedule_pb2.Schedule, *, tenant: str, max_payload_bytes: int, prefix: str = "schedule."
) -> ValidSchedule:
    """Validates a schedule as CreateSchedule (or a merged UpdateSchedule) sends it.

    Output-only fields are ignored. Raises InvalidArgument naming every bad field.
    """
    out: list[FieldViolation] = []
    check_name(msg.name, prefix + "name", out)
    spec: CronSpec | None = None
    time_zone = msg.time_zone or DEFAULT_TIME_ZONE
    cron_ok = _check_cron(msg.cron, prefix + "cron", out)
    zone_ok = _check_time_zone(time_zone, prefix + "time_zone", out)
    if cron_ok and zone_ok:
        spec = compile_cron(msg.cron.strip(), time_zone)

    template_prefix = prefix + "task_template."
    if not msg.HasField("task_template"):
        out.append(FieldViolation(prefix + "task_template", "must be set (at least its type)"))
    else:
        _, bad = validate_submit(
            template_request(msg.task_template),
            max_payload_bytes=max_payload_bytes,
            prefix=template_prefix,
        )
        out.extend(bad)

    overlap = msg.overlap_policy or OVERLAP_ALLOW
    if overlap not in schedule_pb2.OverlapPolicy.values():
        out.append(FieldViolation(prefix + "overlap_policy", f"{overlap} is not an OverlapPolicy"))
    catch_up = msg.catch_up_policy or CATCH_UP_FIRE_ONCE
    if catch_up not in schedule_pb2.CatchUpPolicy.values():
        out.append(FieldViolation(prefix + "catch_up_policy", f"{catch_up} is not a CatchUpPolicy"))
    limit = msg.catch_up_limit or DEFAULT_CATCH_UP_LIMIT
    if not 1 <= limit <= MAX_CATCH_UP_LIMIT:
        out.append(
            FieldViolation(
                prefix + "catch_up_limit",
                f"must be between 1 and {MAX_CATCH_UP_LIMIT} (0 for {DEFAULT_CATCH_UP_LIMIT})",
            )
        )
    start = _timestamp(msg, "start_time", prefix + "start_time", out)
    end = _timestamp(msg, "end_time", prefix + "end_time", out)
    if start is not None and end is not None and end <= start:
        out.append(FieldViolation(prefix + "end_time", "must be after start_time"))
    if out or spec is None:
        raise InvalidArgument(out)

    template = schedule_pb2.TaskTemplate()
    template.CopyFrom(msg.task_template)
    template.queue = template.queue or defaults.DEFAULT_QUEUE
    row = ScheduleRow(
        tenant=tenant,
        name=msg.name,
        cron=spec.expression,
        time_zone=time_zone,
        template=template.SerializeToString(deterministic=True),
        overlap_policy=overlap,
        catch_up_policy=catch_up,
        catch_up_limit=limit,
        start_time=start,
        end_time=end,
    )
    return ValidSchedule(row=row, spec=spec, paused=msg.paused)


def apply_mask(
    current: schedule_pb2.Schedule,
    patch: schedule_pb2.Schedule,
    mask: field_mask_pb2.FieldMask,
) -> tuple[schedule_pb2.Schedule, bool]:
    """``current`` with the masked fields taken from ``patch``; and whether timing changed.

    An empty mask (or "*") means every updatable field.
    """
    paths = list(mask.paths)
    if not paths or paths == ["*"]:
        paths = list(UPDATABLE)
    out: list[FieldViolation] = []
    merged = schedule_pb2.Schedule()
    merged.CopyFrom(current)
    timing = False
    for i, path in enumerate(paths):
        head, _, rest = path.partition(".")
        if head in UPDATABLE and not rest:
            _copy_field(merged, patch, head)
            timing = timing or head in TIMING
        elif head == "task_template" and rest in TEMPLATE_FIELDS:
            _copy_field(merged.task_template, patch.task_template, rest)
        else:
            allowed = ", ".join((*UPDATABLE, "task_template.<field>"))
            out.append(
                FieldViolation(
                    f"update_mask.paths[{i}]",
                    f"{path!r} cannot be updated; use one of {allowed} "
                    "(PauseSchedule and ResumeSchedule change paused)",
                )
            )
    if out:
        raise InvalidArgument(out)
    return merged, timing


def _copy_field(target: Any, source: Any, name: str) -> None:
    value = getattr(source, name)
    if isinstance(value, Message):
        if source.HasField(name):
            getattr(target, name).CopyFrom(value)
        else:
            target.ClearField(name)
    elif isinstance(value, str | bytes | int | float):
        setattr(target, name, value)
    else:  # a map (the template's labels)
        target.ClearField(name)
        getattr(target, name).update(value)


@dataclass(frozen=True)
class ListPage:
    after_name: str | None
    page_size: int


def validate_list(page_size: int, page_token: str) -> ListPage:
    out: list[FieldViolation] = []
    size = check_page_size(page_size, out)
    after: str | None = None
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (binascii.Error, UnicodeError, ValueError):
            after = None
        if after is None or name_problem(after) is not None:
            out.append(FieldViolation("page_token", "is not a token from a previous call"))
    if out:
        raise InvalidArgument(out)
    return ListPage(after, size)


def page_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()
