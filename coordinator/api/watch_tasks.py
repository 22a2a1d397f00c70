"""``TaskService.WatchTasks``: the request checked, then the hub's stream written out.

The streams themselves, their bounds and where their changes come from are
``lifecycle/task_events.py``'s; ``TaskServicer.WatchTasks`` only calls :func:`serve`.
"""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api import context
from conveyor.coordinator.api.validation import _check_labels, check_name
from conveyor.coordinator.errors import FieldViolation, InvalidArgument
from conveyor.coordinator.lifecycle.task_events import TaskEventHub, WatchFilter
from conveyor.v1 import task_pb2, watch_pb2

MAX_FILTER_ENTRIES = 100


def watch_filter(request: watch_pb2.WatchTasksRequest) -> WatchFilter:
    """The request's filter; INVALID_ARGUMENT naming each bad field."""
    out: list[FieldViolation] = []
    for field, names in (("queues", request.queues), ("types", request.types)):
        if len(names) > MAX_FILTER_ENTRIES:
            out.append(FieldViolation(field, f"at most {MAX_FILTER_ENTRIES} entries"))
        for i, name in enumerate(names[:MAX_FILTER_ENTRIES]):
            check_name(name, f"{field}[{i}]", out, required=True)
    for i, state in enumerate(request.states):
        if state not in task_pb2.TaskState.values() or state == task_pb2.TASK_STATE_UNSPECIFIED:
            out.append(FieldViolation(f"states[{i}]", f"{state} is not a task state"))
    labels = dict(request.labels)
    _check_labels(labels, "", out)
    if out:
        raise InvalidArgument(out)
    return WatchFilter(
        queues=frozenset(request.queues),
        types=frozenset(request.types),
        states=frozenset(request.states),
        labels=tuple(sorted(labels.items())),
    )


async def serve(
    hub: TaskEventHub,
    request: watch_pb2.WatchTasksRequest,
    context_: grpc.aio.ServicerContext[Any, Any],
) -> None:
    """Writes the stream's changes until the caller cancels or the hub ends it."""
    flt = watch_filter(request)
    tenant = context.current().tenant
    with hub.stream(tenant, flt) as stream:
        # The first, empty response: the stream is open; changes from here on are sent.
        await context_.write(watch_pb2.WatchTasksResponse())
        while True:
            events = await stream.next()
            response = watch_pb2.WatchTasksResponse()
            add = response.events.add
            for task_id, queue, type_, from_state, state, attempt, at in events:
                add(
                    task_id=task_id,
                    queue=queue,
                    type=type_,
                    from_state=from_state,
                    state=state,
                    attempt=attempt,
                    time=convert.timestamp_from_seconds(at),
                )
            await context_.write(response)


__all__ = ["serve", "watch_filter"]
