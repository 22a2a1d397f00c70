"""Receiving Conveyor's webhooks: check the signature, then trust the event.

The coordinator signs each delivery the way the Standard Webhooks specification says
(``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers, an HMAC-SHA256 of
``id.timestamp.body`` under the subscription's ``whsec_`` secret). A receiver verifies the
raw body, exactly as received, before reading it::

    from conveyor.client.webhooks import WebhookReceiver, WebhookVerificationError

    receiver = WebhookReceiver(os.environ["CONVEYOR_WEBHOOK_SECRET"])

    async def handle(request: web.Request) -> web.Response:      # aiohttp, say
        try:
            event = receiver.verify(await request.read(), request.headers)
        except WebhookVerificationError:
            return web.Response(status=401)
        if not already_seen(event.id):       # delivery is at least once: deduplicate
            record(event.task_id, event.state)
        return web.Response(status=204)      # any 2xx; anything else is retried

A request is refused when a header is missing, its timestamp is more than five minutes
from the receiver's clock (a replayed capture), or no signature matches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _Unverified

from conveyor.client._models import TaskState
from conveyor.transport._errors import ConveyorError

__all__ = ["WebhookEvent", "WebhookReceiver", "WebhookVerificationError"]


class WebhookVerificationError(ConveyorError):
    """A webhook request is not Conveyor's: unsigned, wrongly signed, stale or malformed."""


@dataclass(frozen=True)
class WebhookEvent:
    """One task state change, as delivered."""

    id: str
    """The ``webhook-id``: the same for every retry and replay of this event."""
    type: str
    """``task.<state>``, e.g. ``task.succeeded``."""
    timestamp: datetime
    """When the state changed (the database's clock)."""
    task_id: str
    queue: str
    task_type: str
    from_state: TaskState
    """UNSPECIFIED for a task just submitted."""
    state: TaskState
    attempt: int


def _state(name: object) -> TaskState:
    try:
        return TaskState(str(name))
    except ValueError:
        return TaskState.UNSPECIFIED


class WebhookReceiver:
    """Verifies deliveries signed with one subscription's secret (``whsec_...``)."""

    def __init__(self, secret: str) -> None:
        if not secret.startswith("whsec_"):
            raise ValueError("a webhook secret starts with whsec_ (as CreateWebhook shows it)")
        self._webhook = Webhook(secret)

    def verify(self, body: bytes | str, headers: Mapping[str, str]) -> WebhookEvent:
        """The event of a request whose signature matches; raises
        :class:`WebhookVerificationError` otherwise."""
        plain = {str(k).lower(): str(v) for k, v in headers.items()}
        try:
            event = self._webhook.verify(body, plain)
        except _Unverified as exc:
            raise WebhookVerificationError(f"webhook request refused: {exc}") from None
        except ValueError as exc:  # a signed body that is not JSON: not ours
            raise WebhookVerificationError(f"webhook body is not JSON: {exc}") from None
        try:
            data = event["data"]
            return WebhookEvent(
                id=plain["webhook-id"],
                type=str(event["type"]),
                timestamp=datetime.fromisoformat(str(event["timestamp"])),
                task_id=str(data["task_id"]),
                queue=str(data["queue"]),
                task_type=str(data["type"]),
                from_state=_state(data["from_state"]),
                state=_state(data["state"]),
                attempt=int(data["attempt"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WebhookVerificationError(
                f"webhook body is not a Conveyor event: {json.dumps(event)[:200]} ({exc})"
            ) from None
