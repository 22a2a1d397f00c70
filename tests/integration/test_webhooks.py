"""Webhooks end to end: the outbox written with each state change, delivered signed by the
leader to a real HTTP server, through a SIGKILL of the coordinator; and the API's tenant
isolation, input checks and default address guard."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from aiohttp import web
from clitools import conveyor
from cluster import CoordinatorProcess
from processes import free_port
from security import bearer
from tenancy import secure_coordinator
from testsupport import eventually

from conveyor.client.webhooks import WebhookReceiver, WebhookVerificationError
from conveyor.v1 import (
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)

PENDING = task_pb2.TASK_STATE_PENDING
CANCELLED = task_pb2.TASK_STATE_CANCELLED
Delivery = webhook_service_pb2.WebhookDelivery


@dataclass
class Receiver:
    """A webhook receiver on loopback that keeps every request as it came, and answers
    500 to the first request of the first ``fail_first`` events (to force retries)."""

    fail_first: int = 3
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append((headers, body))
        msg_id = headers.get("webhook-id", "")
        if len(self.failed) < self.fail_first and msg_id not in self.failed:
            self.failed.add(msg_id)
            return web.Response(status=500)
        return web.Response(status=204)

    def ids(self) -> Counter[str]:
        return Counter(h.get("webhook-id", "") for h, _ in self.requests)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def _submit(
    stub: task_service_pb2_grpc.TaskServiceAsyncStub, count: int, queue: str = "hooks"
) -> list[str]:
    request = task_service_pb2.SubmitTasksRequest(
        tasks=[task_service_pb2.SubmitTaskRequest(queue=queue, type="t") for _ in range(count)]
    )
    reply = await stub.SubmitTasks(request, timeout=10)
    return [r.task.id for r in reply.results]


@pytest.mark.slow
async def test_every_event_arrives_signed_across_a_coordinator_kill(
    database_dsn: str, tmp_path: Path, receiver: Receiver
) -> None:
    coordinator = CoordinatorProcess(
        database_dsn, None, log_dir=tmp_path, extra_args=["--webhook-allow-private"]
    )
    coordinator.start()
    db = await asyncpg.connect(database_dsn)
    try:
        await coordinator.wait_serving()
        # The CLI makes the subscription (and shows its secret once).
        created = await conveyor(
            "webhooks", "create", receiver.url, "--state", "pending", "--state", "cancelled",
            "--queue", "hooks", "--json", "--coordinator", coordinator.address,
        )  # fmt: skip
        assert created.code == 0, created.err
        webhook = json.loads(created.out)
        assert webhook["secret"].startswith("whsec_")
        verifier = WebhookReceiver(webhook["secret"])

        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            hooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            # 70 tasks go in with COPY (the outbox written after it), 5 of a queue the
            # filter leaves out.
            first = await _submit(tasks, 70)
            await _submit(tasks, 5, queue="other")

            async def retries_recorded() -> bool:
                failed = await db.fetchval(
                    "SELECT count(*) FROM webhook_attempts WHERE status_code = 500"
                )
                return bool(failed >= receiver.fail_first)

            await eventually(retries_recorded, timeout=20, what="the 500s recorded")
            # Events committed just before the kill, and the three retries still owed.
            second = await _submit(tasks, 10)
            coordinator.kill()
            await coordinator.wait_exit(10)
            coordinator.start()
            await coordinator.wait_serving()
            third = [
                (await tasks.SubmitTask(
                    task_service_pb2.SubmitTaskRequest(queue="hooks", type="t"), timeout=10
                )).task.id
                for _ in range(3)
            ]  # fmt: skip
            cancelled = first[:10]
            for task_id in cancelled:
                await tasks.CancelTask(task_service_pb2.CancelTaskRequest(id=task_id), timeout=10)

            expected = {(t, "PENDING") for t in first + second + third}
            expected |= {(t, "CANCELLED") for t in cancelled}

            def received() -> set[tuple[str, str]]:
                events = set()
                for headers, body in receiver.requests:
                    event = verifier.verify(body, headers)  # every request is signed
                    events.add((event.task_id, event.state.value))
                return events

            await eventually(
                lambda: received() >= expected, timeout=30, what="every event delivered"
            )
            assert received() == expected  # nothing of queue "other"
            # One id per event: a receiver deduplicates on it (retries reuse it).
            ids = receiver.ids()
            assert len(ids) == len(expected)
            assert all(ids[m] >= 2 for m in receiver.failed)

            reply = await hooks.ListWebhookDeliveries(
                webhook_service_pb2.ListWebhookDeliveriesRequest(
                    webhook_id=webhook["id"], page_size=1000
                ),
                timeout=10,
            )

            def settled() -> bool:
                return all(d.status == Delivery.STATUS_DELIVERED for d in reply.deliveries)

            if not settled():  # the last attempts' records may trail the requests
                reply = await eventually(
                    lambda: _deliveries_if_settled(hooks, webhook["id"]),
                    timeout=10,
                    what="every delivery recorded as delivered",
                )
            assert len(reply.deliveries) == len(expected)
            retried = [d for d in reply.deliveries if d.id in receiver.failed]
            assert len(retried) == receiver.fail_first
            for d in retried:
                assert [a.status_code for a in d.attempts][:1] == [500]
                assert d.attempts[-1].status_code == 204

            # A replay is delivered again under the same id.
            replayed = reply.deliveries[0].id
            before = receiver.ids()[replayed]
            answer = await hooks.ReplayWebhookDeliveries(
                webhook_service_pb2.ReplayWebhookDeliveriesRequest(
                    webhook_id=webhook["id"], delivery_ids=[replayed]
                ),
                timeout=10,
            )
            assert answer.replayed == 1
            await eventually(
                lambda: receiver.ids()[replayed] > before, timeout=10, what="the replay"
            )

        # The receiver helper refuses what the coordinator did not sign.
        headers, body = receiver.requests[-1]
        with pytest.raises(WebhookVerificationError):
            WebhookReceiver("whsec_" + "QUJD" * 8).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body.replace(b"PENDING", b"SUCCEEDED"), headers)
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body, {**headers, "webhook-signature": "v1,Zm9yZ2Vk"})
    finally:
        await db.close()
        coordinator.close()


async def _deliveries_if_settled(
    hooks: webhook_service_pb2_grpc.WebhookServiceAsyncStub, webhook_id: str
) -> webhook_service_pb2.ListWebhookDeliveriesResponse | None:
    reply: webhook_service_pb2.ListWebhookDeliveriesResponse = await hooks.ListWebhookDeliveries(
        webhook_service_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id, page_size=1000),
        timeout=10,
    )
    if all(d.status == Delivery.STATUS_DELIVERED for d in reply.deliveries):
        return reply
    return None


async def test_webhooks_are_tenant_isolated_checked_and_guarded(database_dsn: str) -> None:
    async with secure_coordinator(database_dsn) as secure:
        hooks = webhook_service_pb2_grpc.WebhookServiceStub(secure.channel)
        tasks = task_service_pb2_grpc.TaskServiceStub(secure.channel)
        acme = await secure.keys.create("acme", "submit", "read", "operate")
        other = await secure.keys.create("other", "submit", "read", "operate")

        async def create(key: str, **fields: object) -> webhook_service_pb2.Webhook:
            request = webhook_service_pb2.CreateWebhookRequest(**fields)  # type: ignore[arg-type]
            reply = await hooks.CreateWebhook(request, metadata=bearer(key), timeout=10)
            return reply.webhook

        async def refused(key: str, **fields: object) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(key, **fields)
            return caught.value

        # By default only public addresses over https: loopback, private, link-local
        # (metadata), IPv4-in-IPv6 and plain http are refused as bad input.
        for url in (
            "http://hooks.example.com/x",
            "https://127.0.0.1/x",
            "https://localhost:8443/x",
            "https://10.1.2.3/x",
            "https://192.168.0.10/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[fd00:ec2::254]/x",
            "ftp://hooks.example.com/x",
            "https://user:pw@hooks.example.com/x",
            "not a url",
        ):
            err = await refused(acme.key, url=url)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        bad_inputs: list[dict[str, object]] = [
            {"url": ""},
            {"url": "https://hooks.example.com/x", "secret": "not-a-secret"},
            {"url": "https://hooks.example.com/x", "secret": "whsec_c2hvcnQ="},
            {"url": "https://hooks.example.com/x", "states": [99]},
            {"url": "https://hooks.example.com/x", "queues": ["bad queue"]},
            {"url": "https://hooks.example.com/x", "description": "x\x00"},
        ]
        for fields in bad_inputs:
            err = await refused(acme.key, **fields)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, fields

        mine = await create(acme.key, url="https://hooks.example.com/x", states=[PENDING])
        assert mine.secret.startswith("whsec_")

        # The other tenant neither sees nor touches it.
        theirs = await hooks.ListWebhooks(
            webhook_service_pb2.ListWebhooksRequest(), metadata=other.metadata, timeout=10
        )
        assert list(theirs.webhooks) == []
        for call in (
            hooks.DeleteWebhook(
                webhook_service_pb2.DeleteWebhookRequest(id=mine.id), metadata=other.metadata
            ),
            hooks.ListWebhookDeliveries(
                webhook_service_pb2.ListWebhookDeliveriesRequest(webhook_id=mine.id),
                metadata=other.metadata,
            ),
            hooks.ReplayWebhookDeliveries(
                webhook_service_pb2.ReplayWebhookDeliveriesRequest(
                    webhook_id=mine.id, all_failed=True
                ),
                metadata=other.metadata,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        ours = await hooks.ListWebhooks(
            webhook_service_pb2.ListWebhooksRequest(), metadata=acme.metadata, timeout=10
        )
        assert [w.id for w in ours.webhooks] == [mine.id]
        assert ours.webhooks[0].secret == ""  # shown once, at creation
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hooks.ListWebhookDeliveries(
                webhook_service_pb2.ListWebhookDeliveriesRequest(webhook_id="nope"),
                metadata=acme.metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A state change writes an event for the subscribed tenant only, matching its filter.
        for key in (acme, other):
            await tasks.SubmitTask(
                task_service_pb2.SubmitTaskRequest(queue="q", type="t"),
                metadata=key.metadata,
                timeout=10,
            )
        conn = await asyncpg.connect(database_dsn)
        try:
            rows = await conn.fetch("SELECT tenant, to_state FROM webhook_outbox")
            assert [(r["tenant"], r["to_state"]) for r in rows] == [("acme", PENDING)]
        finally:
            await conn.close()

        # Deleting it takes its deliveries with it; a second delete is NOT_FOUND.
        await hooks.DeleteWebhook(
            webhook_service_pb2.DeleteWebhookRequest(id=mine.id), metadata=acme.metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hooks.DeleteWebhook(
                webhook_service_pb2.DeleteWebhookRequest(id=mine.id), metadata=acme.metadata
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
