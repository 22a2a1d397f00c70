"""``WebhookService``: a tenant's webhook subscriptions and their deliveries.

Everything is the caller's tenant's (read from the request context): another tenant's
subscription id is NOT_FOUND, as one that does not exist. The outbox rows are written by
the state changes themselves (``store/transitions.py``) and delivered by the leader
(``webhooks/delivery.py``); this service only manages subscriptions, lists what was
delivered and makes deliveries due again.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from typing import Any

import asyncpg
import grpc

from conveyor.coordinator import convert
from conveyor.coordinator.api import context
from conveyor.coordinator.api.validation import check_name, check_page_size, check_text
from conveyor.coordinator.deps import Deps
from conveyor.coordinator.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    WebhookNotFound,
)
from conveyor.coordinator.store import webhooks as store
from conveyor.coordinator.webhooks.delivery import message_id
from conveyor.coordinator.webhooks.guard import url_problem
from conveyor.v1 import task_pb2, webhook_service_pb2, webhook_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

MAX_WEBHOOKS = 25
"""Subscriptions one tenant may have (each matching transition is one outbox row each)."""
MAX_FILTER_ENTRIES = 100
MAX_DESCRIPTION_LENGTH = 1000
MAX_REPLAY_IDS = 1000
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
_MIN_SECRET_BYTES, _MAX_SECRET_BYTES = 24, 64

_STATUS_TO_ROW = {
    webhook_service_pb2.WebhookDelivery.STATUS_PENDING: store.PENDING,
    webhook_service_pb2.WebhookDelivery.STATUS_DELIVERED: store.DELIVERED,
    webhook_service_pb2.WebhookDelivery.STATUS_FAILED: store.FAILED,
}
_ROW_TO_STATUS = {row: status for status, row in _STATUS_TO_ROW.items()}


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_problem(secret: str) -> str | None:
    """What is wrong with a secret a caller chose (None: nothing)."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX} (or be empty: one is made)"
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"must be {SECRET_PREFIX} and standard base64"
    if not _MIN_SECRET_BYTES <= len(key) <= _MAX_SECRET_BYTES:
        return f"must encode {_MIN_SECRET_BYTES} to {_MAX_SECRET_BYTES} bytes (got {len(key)})"
    return None


def _webhook(row: asyncpg.Record, *, secret: bool = False) -> webhook_service_pb2.Webhook:
    return webhook_service_pb2.Webhook(
        id=str(row["id"]),
        url=row["url"],
        secret=row["secret"] if secret else "",
        states=list(row["states"]),
        queues=list(row["queues"]),
        types=list(row["types"]),
        description=row["description"],
        create_time=convert.timestamp(row["create_time"]),
    )


def _webhook_id(value: str, field: str = "webhook_id") -> uuid.UUID:
    if not value:
        raise InvalidArgument([FieldViolation(field, "must not be empty")])
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(
            [FieldViolation(field, f"{value[:64]!r} is not a webhook id (conveyor webhooks list)")]
        ) from None


def _delivery_id(value: str, field: str) -> int:
    number = value.removeprefix("msg_")
    if not value.startswith("msg_") or not number.isdigit() or len(number) > 18:
        raise InvalidArgument(
            [FieldViolation(field, f"{value[:64]!r} is not a delivery id (msg_<number>)")]
        )
    return int(number)


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def CreateWebhook(
        self, request: webhook_service_pb2.CreateWebhookRequest, context_: Context
    ) -> webhook_service_pb2.CreateWebhookResponse:
        tenant = context.current().tenant
        out: list[FieldViolation] = []
        if not request.url:
            out.append(FieldViolation("url", "must not be empty"))
        else:
            problem = url_problem(
                request.url, allow_private=self._deps.config.webhook_allow_private
            )
            if problem is not None:
                out.append(FieldViolation("url", problem))
        if request.secret:
            problem = secret_problem(request.secret)
            if problem is not None:
                out.append(FieldViolation("secret", problem))
        for i, state in enumerate(request.states):
            if state not in task_pb2.TaskState.values() or state == task_pb2.TASK_STATE_UNSPECIFIED:
                out.append(FieldViolation(f"states[{i}]", f"{state} is not a task state"))
        for field, names in (("queues", request.queues), ("types", request.types)):
            if len(names) > MAX_FILTER_ENTRIES:
                out.append(FieldViolation(field, f"at most {MAX_FILTER_ENTRIES} entries"))
            for i, name in enumerate(names[:MAX_FILTER_ENTRIES]):
                check_name(name, f"{field}[{i}]", out, required=True)
        check_text(
            request.description,
            "description",
            out,
            max_length=MAX_DESCRIPTION_LENGTH,
            identifier=False,
        )
        if out:
            raise InvalidArgument(out)
        sub = store.NewSubscription(
            tenant=tenant,
            url=request.url,
            secret=request.secret or new_secret(),
            states=sorted(set(request.states)),
            queues=sorted(set(request.queues)),
            types=sorted(set(request.types)),
            description=request.description,
        )
        async with self._deps.db.autocommit() as conn:
            row = await store.create(conn, sub, MAX_WEBHOOKS)
        if row is None:
            raise QuotaExceeded(
                "webhooks",
                f"tenant {tenant!r} has {MAX_WEBHOOKS} webhook subscriptions, the most "
                "allowed; delete one first (conveyor webhooks delete)",
                None,
            )
        return webhook_service_pb2.CreateWebhookResponse(webhook=_webhook(row, secret=True))

    async def ListWebhooks(
        self, request: webhook_service_pb2.ListWebhooksRequest, context_: Context
    ) -> webhook_service_pb2.ListWebhooksResponse:
        tenant = context.current().tenant
        async with self._deps.db.read() as conn:
            rows = await store.list_for(conn, tenant)
        return webhook_service_pb2.ListWebhooksResponse(webhooks=[_webhook(r) for r in rows])

    async def DeleteWebhook(
        self, request: webhook_service_pb2.DeleteWebhookRequest, context_: Context
    ) -> webhook_service_pb2.DeleteWebhookResponse:
        tenant = context.current().tenant
        sub_id = _webhook_id(request.id, "id")
        async with self._deps.db.autocommit() as conn:
            if not await store.delete(conn, tenant, sub_id):
                raise WebhookNotFound(request.id)
        return webhook_service_pb2.DeleteWebhookResponse()

    async def ListWebhookDeliveries(
        self, request: webhook_service_pb2.ListWebhookDeliveriesRequest, context_: Context
    ) -> webhook_service_pb2.ListWebhookDeliveriesResponse:
        tenant = context.current().tenant
        sub_id = _webhook_id(request.webhook_id)
        out: list[FieldViolation] = []
        page_size = check_page_size(request.page_size, out)
        status: int | None = None
        if request.status:
            status = _STATUS_TO_ROW.get(request.status)
            if status is None:
                out.append(FieldViolation("status", f"{request.status} is not a delivery status"))
        before: int | None = None
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 18:
                out.append(FieldViolation("page_token", "is not a token this call returned"))
            else:
                before = int(request.page_token)
        if out:
            raise InvalidArgument(out)
        async with self._deps.db.read() as conn:
            if await store.get(conn, tenant, sub_id) is None:
                raise WebhookNotFound(request.webhook_id)
            rows = await store.deliveries(
                conn, tenant, sub_id, status=status, before=before, limit=page_size
            )
            attempts = await store.attempts_of(conn, tenant, [r["id"] for r in rows])
        response = webhook_service_pb2.ListWebhookDeliveriesResponse()
        by_id: dict[int, webhook_service_pb2.WebhookDelivery] = {}
        for row in rows:
            delivery = response.deliveries.add(
                id=message_id(row["id"]),
                webhook_id=str(row["subscription_id"]),
                task_id=str(row["task_id"]),
                queue=row["queue"],
                type=row["type"],
                from_state=row["from_state"],
                state=row["to_state"],
                task_attempt=row["attempt"],
                event_time=convert.timestamp(row["event_time"]),
                status=_ROW_TO_STATUS.get(row["status"], 0),
                next_attempt_time=convert.maybe_timestamp(
                    row["next_attempt_time"] if row["status"] == store.PENDING else None
                ),
                delivered_time=convert.maybe_timestamp(row["delivered_time"]),
            )
            by_id[row["id"]] = delivery
        for a in attempts:
            by_id[a["outbox_id"]].attempts.add(
                attempt=a["attempt"],
                time=convert.timestamp(a["time"]),
                status_code=a["status_code"] or 0,
                error=a["error"],
                duration_ms=a["duration_ms"],
            )
        if len(rows) == page_size:
            response.next_page_token = str(rows[-1]["id"])
        return response

    async def ReplayWebhookDeliveries(
        self, request: webhook_service_pb2.ReplayWebhookDeliveriesRequest, context_: Context
    ) -> webhook_service_pb2.ReplayWebhookDeliveriesResponse:
        tenant = context.current().tenant
        sub_id = _webhook_id(request.webhook_id)
        if len(request.delivery_ids) > MAX_REPLAY_IDS:
            raise InvalidArgument(
                [FieldViolation("delivery_ids", f"at most {MAX_REPLAY_IDS} per call")]
            )
        ids = [_delivery_id(v, f"delivery_ids[{i}]") for i, v in enumerate(request.delivery_ids)]
        if not ids and not request.all_failed:
            raise InvalidArgument(
                [FieldViolation("delivery_ids", "name deliveries, or set all_failed")]
            )
        async with self._deps.db.autocommit() as conn:
            if await store.get(conn, tenant, sub_id) is None:
                raise WebhookNotFound(request.webhook_id)
            count = await store.replay(conn, tenant, sub_id, ids, all_failed=request.all_failed)
        return webhook_service_pb2.ReplayWebhookDeliveriesResponse(replayed=count)
