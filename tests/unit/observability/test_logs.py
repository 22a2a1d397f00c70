"""Text and JSON log lines with task fields (conveyor.observability.logs)."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from conveyor.observability import logs


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """Configures the root logger into a buffer; puts the previous set-up back after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    yield buffer, logging.getLogger("conveyor.test")
    root.handlers[:], level = saved
    root.setLevel(level)


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_task_fields_as_keys(capture: tuple[io.StringIO, logging.Logger]) -> None:
    buffer, log = capture
    logs.configure("info", "json", stream=buffer)
    with logs.log_context(task_id="t-1", attempt=2, queue="q", type="email", worker_id="w-1"):
        with logs.log_context(tenant="acme", epoch=7):
            log.info("sending %s", "mail")
        log.warning("outside the inner block")
    log.info("no task")
    first, second, third = json_lines(buffer)
    assert first["message"] == "sending mail"
    assert first["level"] == "info"
    assert first["logger"] == "conveyor.test"
    for key, expected in {
        "task_id": "t-1",
        "attempt": 2,
        "queue": "q",
        "type": "email",
        "worker_id": "w-1",
        "tenant": "acme",
        "epoch": 7,
    }.items():
        assert first[key] == expected, key
    assert "tenant" not in second and second["task_id"] == "t-1"
    assert not set(logs.FIELDS) & set(third)


def test_a_task_logger_binds_fields_and_extra_wins(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, log = capture
    logs.configure("debug", "json", stream=buffer)
    bound = logs.task_logger(log, task_id="t-9", attempt=1, queue="q", type="x", tenant=None)
    bound.debug("one")
    bound.info("two", extra={"attempt": 5})
    one, two = json_lines(buffer)
    assert (one["task_id"], one["attempt"], one["queue"], one["type"]) == ("t-9", 1, "q", "x")
    assert "tenant" not in one
    assert two["attempt"] == 5


def test_unknown_fields_are_refused_with_the_list_of_fields() -> None:
    with pytest.raises(TypeError, match=r"unknown log field.*task_id"), logs.log_context(tsk=1):
        pass
    with pytest.raises(TypeError, match="unknown log field"):
        logs.task_logger("x", job="1")


def test_text_format_is_unchanged_without_fields_and_appends_them_with(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, log = capture
    logs.configure("info", "text", stream=buffer)
    log.info("plain")
    with logs.log_context(task_id="t-1", attempt=3):
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = buffer.getvalue().splitlines()
    # The CLI's format before this module: "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO  conveyor\.test: plain", lines[0])
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d ERROR conveyor\.test: failed \[task_id=t-1 attempt=3\]", lines[1]
    )
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


async def test_concurrent_tasks_and_threads_keep_their_own_fields(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, log = capture
    logs.configure("info", "json", stream=buffer)
    both_inside = asyncio.Barrier(2)

    async def handler(task_id: str) -> None:
        with logs.log_context(task_id=task_id):
            await both_inside.wait()  # both contexts are open at once
            log.info("async")
            # A sync handler runs in a thread in a copy of the task's context.
            ctx = contextvars.copy_context()
            done = threading.Event()

            def in_thread() -> None:
                log.info("thread")
                done.set()

            threading.Thread(target=ctx.run, args=(in_thread,)).start()
            await asyncio.to_thread(done.wait, 5)

    await asyncio.gather(handler("a"), handler("b"))
    pairs = sorted((line["message"], line["task_id"]) for line in json_lines(buffer))
    assert pairs == [("async", "a"), ("async", "b"), ("thread", "a"), ("thread", "b")]


def test_json_lines_name_the_active_trace(capture: tuple[io.StringIO, logging.Logger]) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    buffer, log = capture
    logs.configure("info", "json", stream=buffer)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = json_lines(buffer)
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert inside["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert "trace_id" not in outside


def test_bad_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not one of: text, json"):
        logs.configure("info", "yaml")


async def test_lazy_fields_bound_to_a_task_are_made_only_when_it_logs(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, log = capture
    logs.configure("info", "json", stream=buffer)
    made: list[str] = []

    def fields(task_id: str) -> dict[str, object]:
        made.append(task_id)
        return {"task_id": task_id, "attempt": 1}

    async def task(task_id: str, talk: bool) -> None:
        logs.bind_fields(logs.LazyFields(lambda: fields(task_id)))
        if talk:
            with logs.log_context(queue="q"):  # adds to the bound fields
                log.info("one")
            log.info("two")

    await asyncio.gather(
        asyncio.create_task(task("quiet", False)), asyncio.create_task(task("t", True))
    )
    log.info("outside")
    assert made == ["t"], "made once, and only for the task that logged"
    one, two, outside = json_lines(buffer)
    assert (one["task_id"], one["attempt"], one["queue"]) == ("t", 1, "q")
    assert (two["task_id"], "queue" in two) == ("t", False)
    assert "task_id" not in outside


def test_json_times_are_iso_8601_utc_with_milliseconds(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    # Issue 20, first hour: they were local time without a zone, to the second.
    buffer, logger = capture
    logs.configure("info", "json", stream=buffer)
    logger.info("when")
    (line,) = json_lines(buffer)
    stamp = str(line["time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60
