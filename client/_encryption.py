"""Where the client applies its payload codec: on what it sends, and on what it reads.

- Sending: every task payload (submit, submit_many) and schedule template payload is
  encoded once, just before it leaves; the client's own resends reuse the encoded
  message, and a submit with an idempotency key encodes to the same bytes every time
  (see ``transport/_encryption.py``), so both stay recognisable resends.
- Reading: payloads and results of the tasks (and templates of the schedules) it reads
  are decoded. A read never fails because of the codec: what cannot be decoded (a key
  no longer in the ring, say) stays as it travelled, and :func:`require_result` raises
  the precise :class:`DecryptionError` when the application asks for that result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from conveyor.client._models import Schedule, Task
from conveyor.transport._encryption import Binding, DecryptionError, PayloadCodec, is_sealed
from conveyor.v1 import schedule_pb2
from conveyor.v1 import task_service_pb2 as pb

__all__ = ["open_schedule", "open_task", "require_result", "seal_request", "seal_template"]

logger = logging.getLogger("conveyor.client")

# Results carry no content type on the wire; the codec is told this one.
_RESULT_CONTENT_TYPE = ""


def seal_request(codec: PayloadCodec | None, request: pb.SubmitTaskRequest) -> None:
    """Encodes a submit's payload in place, bound to its idempotency key or, without
    one, to its id (``request_id``, which the caller has set)."""
    if codec is None:
        return
    request.payload, request.content_type = codec.encode(
        request.payload,
        request.content_type,
        Binding.payload(
            request.type, task_id=request.request_id, idempotency_key=request.idempotency_key
        ),
        idempotency_key=request.idempotency_key,
    )


def seal_template(
    codec: PayloadCodec | None,
    template: schedule_pb2.TaskTemplate,
    schedule_id: str,
    task_type: str | None = None,
) -> None:
    """Encodes a schedule template's payload in place (each firing's task carries it),
    bound to the schedule ``schedule_id`` and ``task_type`` (by default the template's)."""
    if codec is None:
        return
    template.payload, template.content_type = codec.encode(
        template.payload,
        template.content_type,
        Binding.schedule(task_type or template.type, schedule_id),
    )


def open_task(codec: PayloadCodec | None, task: Task) -> Task:
    """``task`` with its payload and result decoded, as far as the codec can."""
    if codec is None:
        return task
    payload, content_type = task.payload, task.content_type
    binding = Binding.payload(
        task.type, task_id=task.id, idempotency_key=task.idempotency_key or ""
    )
    try:
        payload, content_type = codec.decode(payload, content_type, binding)
    except DecryptionError as exc:
        logger.debug("task %s: payload left encrypted: %s", task.id, exc)
    return _open_result(codec, task, payload, content_type)


def seal_requests(
    codec: PayloadCodec | None, requests: Sequence[pb.SubmitTaskRequest]
) -> list[tuple[bytes, str]]:
    """Encodes submits' payloads in place; returns what they were before (for
    :func:`open_submitted`), or nothing without a codec."""
    if codec is None:
        return []
    plain = [(r.payload, r.content_type) for r in requests]
    for request in requests:
        seal_request(codec, request)
    return plain


def open_submitted(
    codec: PayloadCodec | None, task: Task, plain: Sequence[tuple[bytes, str]], index: int
) -> Task:
    """A submit's answer, decoded without decrypting its payload again: the coordinator
    echoes no payload for a new task, and a repeat of an earlier task has the one this
    client sealed (``plain[index]``, from :func:`seal_requests`), or the submit would have
    been refused. Its result (a repeat of a finished task) is decoded."""
    if codec is None:
        return task
    payload, content_type = plain[index]
    return _open_result(codec, task, payload if task.payload else b"", content_type)


def _open_result(codec: PayloadCodec, task: Task, payload: bytes, content_type: str) -> Task:
    result = task.result
    if result:
        try:
            result, _ = codec.decode(
                result, _RESULT_CONTENT_TYPE, Binding.result(task.type, task.id)
            )
        except DecryptionError as exc:
            logger.debug("task %s: result left encrypted: %s", task.id, exc)
    return dataclasses.replace(task, payload=payload, content_type=content_type, result=result)


def require_result(codec: PayloadCodec | None, task: Task) -> None:
    """Raises the reason when ``task``'s result is still encrypted (not decodable).

    Raises:
        DecryptionError: The result is an envelope this client cannot open.
    """
    if not is_sealed(task.result):
        return
    if codec is None:
        raise DecryptionError(
            f"the result of task {task.id} is encrypted and this client has no key ring: "
            "pass codec=EncryptionCodec.from_key_file(...) (or --encryption-key-file)"
        )
    codec.decode(task.result, _RESULT_CONTENT_TYPE, Binding.result(task.type, task.id))


def open_schedule(codec: PayloadCodec | None, schedule: Schedule) -> Schedule:
    """``schedule`` with its template payload decoded, as far as the codec can."""
    if codec is None or not schedule.payload:
        return schedule
    try:
        payload, content_type = codec.decode(
            schedule.payload, schedule.content_type, Binding.schedule(schedule.type, schedule.id)
        )
    except DecryptionError as exc:
        logger.debug("schedule %s: payload left encrypted: %s", schedule.name, exc)
        return schedule
    return dataclasses.replace(schedule, payload=payload, content_type=content_type)
