"""The leader's webhook deliverer: sends what the outbox owes, signed, and records it.

One per cluster (a service of the leader's term, like the reaper). Each step records the
attempts finished since the last one (one statement), reads what is due, and starts a
delivery for each (at most :data:`MAX_IN_FLIGHT` at once), each on its own: a slow
receiver holds its own deliveries only, never a round. A delivery stays "in flight"
until its attempt is recorded, so it is never started twice by one leader; a leader that
dies between a delivery and its record leaves it due, and the next leader sends it again
(at least once: the receiver deduplicates on ``webhook-id``).

Each request is signed as the Standard Webhooks specification says (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``,
with the subscription's ``whsec_`` secret; the ``standardwebhooks`` library signs), goes
only where the guard allows (``guard.py``), is cut after ``webhook_timeout`` seconds and
reads at most :data:`MAX_RESPONSE_BYTES` of the answer. A 2xx answer delivers it;
anything else is retried after an exponential backoff (with jitter, capped at
:data:`MAX_BACKOFF`) until ``webhook_retry_for`` seconds have passed since the event (or
its replay), and then it is FAILED, replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from standardwebhooks.webhooks import Webhook

from conveyor.coordinator.deps import Deps
from conveyor.coordinator.lifecycle.transitions import Transitions
from conveyor.coordinator.store import webhooks as store
from conveyor.coordinator.supervisor import Service
from conveyor.coordinator.webhooks.guard import connector_options, url_problem
from conveyor.v1 import task_pb2

_log = logging.getLogger("conveyor.coordinator.webhooks")

MAX_IN_FLIGHT = 64
"""Deliveries under way at once (and read per step)."""
MAX_RESPONSE_BYTES = 64 << 10
"""The most of a receiver's answer read (it is not kept: only its status is)."""
MAX_BACKOFF = 300.0
POLL_INTERVAL = 0.5
"""The longest the deliverer goes without looking for due deliveries (events committed
by other coordinators are found this way)."""
MIN_WAKE_INTERVAL = 0.05
"""Transitions committed here wake the deliverer at most this often."""
USER_AGENT = "Conveyor-Webhooks/1"


def message_id(outbox_id: int) -> str:
    """The ``webhook-id`` of an outbox row: the same for every attempt and replay."""
    return f"msg_{outbox_id}"


def event_body(row: asyncpg.Record) -> bytes:
    """The JSON body of a delivery (the Standard Webhooks shape: type, timestamp, data)."""
    state = task_pb2.TaskState.Name(row["to_state"]).removeprefix("TASK_STATE_")
    previous = task_pb2.TaskState.Name(row["from_state"]).removeprefix("TASK_STATE_")
    event = {
        "type": f"task.{state.lower()}",
        "timestamp": row["event_time"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "task_id": str(row["task_id"]),
            "queue": row["queue"],
            "type": row["type"],
            "from_state": previous,
            "state": state,
            "attempt": row["attempt"],
        },
    }
    return json.dumps(event, separators=(",", ":")).encode()


def backoff(attempts: int, initial: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (jittered)."""
    base = min(MAX_BACKOFF, initial * 2.0 ** max(0, attempts - 1))
    return base * random.uniform(0.8, 1.2)


class WebhookDeliverer(Service):
    """Delivers due webhook events (see the module docstring)."""

    name = "webhook deliverer"

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[int, asyncio.Task[store.Attempt]] = {}
        self._finished: list[store.Attempt] = []
        self._subscribed = False
        self._last_step = 0.0
        self.delivered = 0
        """Deliveries answered with 2xx (for tests and logs)."""
        deps.after_commit.listen(self._on_transitions)

    def _on_transitions(self, batch: Transitions) -> None:
        # Events are written only for tenants with subscriptions; without any anywhere,
        # nothing to wake for.
        if self._subscribed and self.running:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last_step >= MIN_WAKE_INTERVAL:
                self.wake()

    async def stop(self) -> None:
        await super().stop()
        tasks, self._in_flight = list(self._in_flight.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._finished = []
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            cfg = self.deps.config
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=MAX_IN_FLIGHT, **connector_options(cfg.webhook_allow_private)
                ),
                timeout=aiohttp.ClientTimeout(total=cfg.webhook_timeout),
                headers={"user-agent": USER_AGENT},
                # No proxy settings from the environment: the guard checks where requests
                # go, and a proxy would connect elsewhere.
                trust_env=False,
            )
        return self._session

    async def step(self) -> float:
        loop = asyncio.get_running_loop()
        self._last_step = loop.time()
        cfg = self.deps.config
        finished, self._finished = self._finished, []
        if finished:
            async with self.deps.db.autocommit() as conn:
                await store.record_attempts(
                    conn, finished, cfg.webhook_retry_for, self.deps.office.fence()
                )
            for attempt in finished:
                self._in_flight.pop(attempt.outbox_id, None)
            self.delivered += sum(a.delivered for a in finished)
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return POLL_INTERVAL
        async with self.deps.db.read() as conn:
            rows = await store.due(conn, MAX_IN_FLIGHT)
            due = [r for r in rows if r["id"] not in self._in_flight][:room]
            if not due:
                self._subscribed = await store.any_subscription(conn)
        for row in due:
            task = loop.create_task(self._deliver(row), name=f"webhook {row['id']}")
            self._in_flight[row["id"]] = task
            task.add_done_callback(functools.partial(self._done, row["id"]))
        if due:
            self._subscribed = True
        return POLL_INTERVAL

    def _done(self, outbox_id: int, task: asyncio.Task[store.Attempt]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # _deliver catches what a delivery can raise: a bug
            _log.error("webhook delivery %s failed unexpectedly", outbox_id, exc_info=exc)
            self._in_flight.pop(outbox_id, None)  # due again at the next step
            return
        self._finished.append(task.result())
        self.wake()

    async def _deliver(self, row: asyncpg.Record) -> store.Attempt:
        cfg = self.deps.config
        outbox_id: int = row["id"]
        retry_in = backoff(row["attempts"] + 1, cfg.webhook_retry_initial)

        def attempt(status: int | None, error: str, started: float) -> store.Attempt:
            elapsed = int((asyncio.get_running_loop().time() - started) * 1000)
            delivered = status is not None and 200 <= status < 300
            return store.Attempt(outbox_id, status, error[:1000], elapsed, delivered, retry_in)

        started = asyncio.get_running_loop().time()
        url: str = row["url"]
        problem = url_problem(url, allow_private=cfg.webhook_allow_private)
        if problem is not None:
            return attempt(None, f"refused: {problem}", started)
        msg_id = message_id(outbox_id)
        body = event_body(row)
        now = datetime.now(UTC)
        try:
            signature = Webhook(row["secret"]).sign(msg_id, now, body)
        except Exception as exc:  # a secret written by hand that cannot be decoded
            return attempt(None, f"the subscription's secret cannot be used: {exc}", started)
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        try:
            async with self._client().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                # Read a little (so the connection can be reused), never all of it.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await response.content.read(MAX_RESPONSE_BYTES)
                status = response.status
        except TimeoutError:
            return attempt(None, f"no answer within {cfg.webhook_timeout:g}s", started)
        except (aiohttp.ClientError, OSError) as exc:
            return attempt(None, _describe(exc), started)
        if 300 <= status < 400:
            return attempt(status, "redirects are not followed", started)
        return attempt(status, "" if 200 <= status < 300 else f"HTTP {status}", started)


def _describe(exc: BaseException) -> str:
    """A failed request in one line, with the guard's refusal where there was one."""
    cause: Any = exc
    while cause is not None:
        if str(cause).startswith("refused:"):
            return str(cause)
        cause = getattr(cause, "os_error", None) or cause.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
