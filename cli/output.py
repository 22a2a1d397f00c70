"""Formatting of tasks and queues for people (tables) and programs (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from conveyor.client import QueueStats, Task, TaskAttempt


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        try:
            return json.loads(value) if value else None
        except ValueError:
            return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """JSON for a client dataclass (or a list of them); payloads and results decoded."""
    if isinstance(value, list):
        return json.dumps([_plain(asdict(v)) for v in value], indent=2)
    return json.dumps(_plain(asdict(value)), indent=2)


def _short(data: bytes, limit: int = 60) -> str:
    text = data.decode("utf-8", "replace") if data else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def task_detail(task: Task, attempts: Sequence[TaskAttempt] = ()) -> str:
    lines = [
        f"id:           {task.id}",
        f"state:        {task.state.value}",
        f"queue/type:   {task.queue} / {task.type}",
        f"attempt:      {task.attempt} of {task.max_attempts}",
        f"priority:     {task.priority}",
        f"created:      {_when(task.create_time)}",
        f"run at:       {_when(task.run_at)}",
        f"finished:     {_when(task.finish_time)}",
        f"payload:      {_short(task.payload, 200)}",
    ]
    if task.idempotency_key:
        lines.append(f"idempotency:  {task.idempotency_key}")
    if task.worker_id:
        lines.append(f"worker:       {task.worker_id}")
    if task.result:
        lines.append(f"result:       {_short(task.result, 200)}")
    if task.last_error:
        lines.append(f"last error:   {task.last_error}")
    if attempts:
        lines.append("attempts:")
        lines.append(
            table(
                ["  #", "WORKER", "STARTED", "ENDED", "OUTCOME", "ERROR"],
                [
                    (
                        f"  {a.attempt}",
                        a.worker_id,
                        _when(a.start_time),
                        _when(a.end_time),
                        a.outcome.value,
                        _short((a.error or "").encode(), 50),
                    )
                    for a in attempts
                ],
            )
        )
    return "\n".join(lines)


def task_table(tasks: Sequence[Task]) -> str:
    return table(
        ["ID", "STATE", "QUEUE", "TYPE", "ATTEMPT", "CREATED"],
        [
            (
                t.id,
                t.state.value,
                t.queue,
                t.type,
                f"{t.attempt}/{t.max_attempts}",
                _when(t.create_time),
            )
            for t in tasks
        ],
    )


def queue_table(queues: Sequence[QueueStats]) -> str:
    if not queues:
        return "no queues have tasks waiting, running or dead"
    return table(
        ["QUEUE", "PENDING", "SCHEDULED", "RUNNING", "DEAD"],
        [(q.name, q.pending, q.scheduled, q.running, q.dead) for q in queues],
    )
