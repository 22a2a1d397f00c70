"""KEDA's external scaler API, driven as KEDA drives it: a client generated from KEDA's own
``externalscaler.proto`` (vendored in proto/conveyor/keda), the trigger's metadata in
``scalerMetadata`` and the API key in ``apiKeyFromEnv`` (KEDA resolves it from the scaled
workload's environment), against a coordinator that requires keys."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from tenancy import secure_coordinator
from testsupport import RawWorker, error_details

from conveyor.keda import externalscaler_pb2 as pb
from conveyor.keda import externalscaler_pb2_grpc as pb_grpc
from conveyor.v1 import task_service_pb2


def ref(**metadata: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="conveyor-worker", namespace="jobs", scalerMetadata=metadata)


async def test_keda_drives_the_scaler_with_the_trigger_metadata(database_dsn: str) -> None:
    async with secure_coordinator(database_dsn) as secure:
        scaler = pb_grpc.ExternalScalerStub(secure.channel)
        acme = await secure.tenant("acme", "submit", "read")
        acme_worker = await secure.tenant("acme", "worker")
        other = await secure.tenant("other", "submit")
        submit_only = await secure.tenant("acme", "submit")

        async def submit(key_metadata: tuple[tuple[str, str], ...], queue: str, n: int) -> None:
            request = task_service_pb2.SubmitTasksRequest(
                tasks=[task_service_pb2.SubmitTaskRequest(type="echo", queue=queue)] * n
            )
            await secure.tasks.SubmitTasks(request, metadata=key_metadata, timeout=10)

        await submit(acme.metadata, "emails", 7)
        await submit(acme.metadata, "sms", 2)
        await submit(other.metadata, "emails", 50)  # another tenant's: never counted
        # One of acme's emails runs on a worker (credit 1).
        worker = RawWorker(secure.coordinator.address)
        try:
            await worker.connect("w1", credits=1, queues=("emails",), metadata=acme_worker.metadata)
            message = await worker.receive()
            assert len(message.assignments.assignments) == 1

            key = acme_worker.key  # what KEDA sends: the value of the env var it names
            emails = ref(queue="emails", target="5", apiKeyFromEnv=key)

            spec = await scaler.GetMetricSpec(emails, timeout=10)
            assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [
                ("conveyor-backlog", 5, 5.0)
            ]

            async def value(scaled: pb.ScaledObjectRef, name: str = "conveyor-backlog") -> float:
                request = pb.GetMetricsRequest(scaledObjectRef=scaled, metricName=name)
                reply = await scaler.GetMetrics(request, timeout=10)
                (metric,) = reply.metricValues
                assert metric.metricName == name
                assert metric.metricValue == math.ceil(metric.metricValueFloat)
                return metric.metricValueFloat

            # 6 pending + 1 running; without the running one, 6; two queues summed.
            assert await value(emails) == 7
            assert await value(ref(queue="emails", includeRunning="false", apiKeyFromEnv=key)) == 6
            assert await value(ref(queue="emails, sms", apiKeyFromEnv=key)) == 9
            assert await value(ref(queue="nothing-here", apiKeyFromEnv=key)) == 0
            # Only some types (those the scaled workers serve): the emails are all echo.
            assert await value(ref(queue="emails", type="echo, sleep", apiKeyFromEnv=key)) == 7
            assert await value(ref(queue="emails", type="send-email", apiKeyFromEnv=key)) == 0
            unserved = ref(queue="emails", type="x", metric="oldestPendingAge", apiKeyFromEnv=key)
            assert await value(unserved, "conveyor-oldest-pending-age") == 0
            age = ref(queue="emails", metric="oldestPendingAge", apiKeyFromEnv=key)
            assert await value(age, "conveyor-oldest-pending-age") > 0
            (age_spec,) = (await scaler.GetMetricSpec(age, timeout=10)).metricSpecs
            assert age_spec.targetSizeFloat == 30.0

            assert (await scaler.IsActive(emails, timeout=10)).result is True
            busy = ref(queue="emails", activationTarget="7", apiKeyFromEnv=key)
            assert (await scaler.IsActive(busy, timeout=10)).result is False
            # An authorization header is read too (grpcurl); a read key will do.
            reply = await scaler.IsActive(ref(queue="sms"), metadata=acme.metadata, timeout=10)
            assert reply.result is True
        finally:
            await worker.close()

        # Refusals are the API's statuses, with its details.
        async def refused(scaled: pb.ScaledObjectRef, code: grpc.StatusCode) -> list[str]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await scaler.GetMetricSpec(scaled, timeout=10)
            details = error_details(caught.value)
            assert details.code == code, details
            return details.fields

        await refused(ref(queue="emails"), grpc.StatusCode.UNAUTHENTICATED)
        await refused(ref(apiKeyFromEnv="cvk_not_a_key"), grpc.StatusCode.UNAUTHENTICATED)
        await refused(ref(apiKeyFromEnv=submit_only.key), grpc.StatusCode.PERMISSION_DENIED)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        fields = await refused(ref(apiKeyFromEnv=key, tenant="other"), invalid)
        assert fields == ["scaledObjectRef.scalerMetadata.tenant"]
        fields = await refused(ref(apiKeyFromEnv=key, type="bad type"), invalid)
        assert fields == ["scaledObjectRef.scalerMetadata.type"]
        fields = await refused(ref(apiKeyFromEnv=key, target="-1", metric="depth"), invalid)
        assert fields == [
            "scaledObjectRef.scalerMetadata.metric",
            "scaledObjectRef.scalerMetadata.target",
        ]

        # StreamIsActive says "inactive" at once, then "active" when work arrives.
        stream = scaler.StreamIsActive(
            ref(queue="burst", streamInterval="0.5", apiKeyFromEnv=key), timeout=20
        )
        try:
            first = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(first, pb.IsActiveResponse) and first.result is False
            await submit(acme.metadata, "burst", 1)
            second = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(second, pb.IsActiveResponse) and second.result is True
            # The key is checked at each look: revoked, it ends the stream.
            await secure.keys.revoke(acme_worker.id)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(stream.read(), 10)
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            stream.cancel()
