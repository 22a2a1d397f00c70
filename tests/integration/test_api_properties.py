"""Property-based tests of the whole API against a real coordinator and PostgreSQL.

Random requests for every RPC (built from the proto descriptors by ``api_strategies``:
NUL and control characters, long unicode, numbers and timestamps at and past every
boundary, unknown enum numbers, and well-formed requests with one timestamp, duration or
number at the edge of its type) and random sequences of worker-protocol messages on a raw
stream. Every answer must be OK or a documented error: a canonical code other than
UNKNOWN/INTERNAL, with a ``google.rpc.ErrorInfo`` in the ``conveyor.dev`` domain whose
reason is an ``ErrorReason``, and ``BadRequest`` field violations for INVALID_ARGUMENT.
Meanwhile a well-formed submit from another caller, sent at the same moment, must
succeed: a bad request fails alone. What was accepted must read back, and no loop that
serves every tenant (the firer, the promoter, the reaper, the dispatcher, the backlog
counter) may fail a round because of it: an accepted value nothing can use later is a
failure too.

The README's test command runs a bounded number of examples with a fixed seed. A longer
run, with new random examples each time:

    CONVEYOR_HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/integration/test_api_properties.py
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from api_strategies import requests
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conveyor.coordinator import Coordinator
from conveyor.coordinator.supervisor import Service
from conveyor.v1 import (
    admin_service_pb2,
    errors_pb2,
    schedule_pb2,
    task_service_pb2,
    worker_service_pb2,
)
from conveyor.v1 import (
    effects_service_pb2 as effects,
)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("CONVEYOR_HYPOTHESIS_EXAMPLES", "40")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    derandomize=False,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROFILE = settings.get_profile(os.environ.get("CONVEYOR_HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.slow

DOMAIN = "conveyor.dev"
REASONS = {
    value.name.removeprefix("ERROR_REASON_") for value in errors_pb2.ErrorReason.DESCRIPTOR.values
} - {"UNSPECIFIED"}
# What a request alone can earn. UNAVAILABLE is not here: nothing in these tests takes a
# store or a leader away, so UNAVAILABLE would mean a bad request broke something shared.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
CALL_TIMEOUT = 30.0


def _services() -> dict[str, Any]:
    return {
        "conveyor.v1.TaskService": task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
        "conveyor.v1.AdminService": admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
        "conveyor.v1.LedgerService": effects.DESCRIPTOR.services_by_name["LedgerService"],
        "conveyor.v1.LockService": effects.DESCRIPTOR.services_by_name["LockService"],
    }


def _message_class(desc: Any) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


UNARY_METHODS = sorted(
    (service_name, method.name)
    for service_name, service in _services().items()
    for method in service.methods
    if not method.server_streaming and not method.client_streaming
)


def _method(service: str, name: str) -> tuple[type[Message], type[Message]]:
    desc = _services()[service].methods_by_name[name]
    return _message_class(desc.input_type), _message_class(desc.output_type)


async def call(
    channel: grpc.aio.Channel, service: str, name: str, request: Message
) -> tuple[Message | None, grpc.aio.AioRpcError | None]:
    request_cls, response_cls = _method(service, name)
    assert isinstance(request, request_cls)
    rpc = channel.unary_unary(
        f"/{service}/{name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    try:
        return await rpc(request, timeout=CALL_TIMEOUT), None
    except grpc.aio.AioRpcError as exc:
        return None, exc


def assert_documented(error: grpc.aio.AioRpcError, what: str) -> None:
    """A documented error: canonical code, ErrorInfo with a known reason, its details."""
    code = error.code()
    assert code in DOCUMENTED, f"{what}: {code.name} {error.details()!r}"
    assert_documented_status(code, error.trailing_metadata(), what)


def assert_documented_status(code: grpc.StatusCode, trailers: Any, what: str) -> None:
    details: dict[str, Any] = {}
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for any_detail in status.details:
                for cls in (
                    error_details_pb2.ErrorInfo,
                    error_details_pb2.BadRequest,
                    error_details_pb2.RetryInfo,
                    error_details_pb2.QuotaFailure,
                ):
                    if any_detail.Is(cls.DESCRIPTOR):
                        detail = cls()
                        any_detail.Unpack(detail)
                        details[cls.DESCRIPTOR.name] = detail
    info = details.get("ErrorInfo")
    assert info is not None, f"{what}: {code.name} without ErrorInfo"
    assert info.domain == DOMAIN, f"{what}: ErrorInfo domain {info.domain!r}"
    assert info.reason in REASONS, f"{what}: reason {info.reason!r} is not an ErrorReason"
    if code == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "INVALID_ARGUMENT":
        bad = details.get("BadRequest")
        assert bad is not None and bad.field_violations, f"{what}: no field violations"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "RetryInfo" in details, f"{what}: RESOURCE_EXHAUSTED without RetryInfo"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_server_errors(what: str) -> Iterator[None]:
    """Fails when the coordinator logged an error with a traceback meanwhile: a handler
    that raised something unexpected (the client then sees UNKNOWN), or a crashed loop."""
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    try:
        yield
    finally:
        root.removeHandler(collect)
    crashes = [r for r in collect.records if r.exc_info or "Unexpected" in r.getMessage()]
    assert not crashes, f"{what}: the coordinator logged {crashes[0].getMessage()!r}"


@pytest.fixture
def coordinator_settings() -> dict[str, Any]:
    """Leases long enough that a worker stream is never given up on here: the test's
    client reads in the coordinator's own event loop, and on a machine running the whole
    suite a write once waited the tests' default 1.5 s of liveness. The coordinator then
    ended the stream as one whose writes were stuck, without a status, and the client got
    DEADLINE_EXCEEDED. No property here is about liveness."""
    return {"lease_duration": 30.0}


@pytest.fixture(autouse=True)
async def loops_keep_serving(coordinator: Coordinator) -> AsyncIterator[None]:
    """After the examples, every leader service still steps, and none ever failed a round
    (an end_time at the largest Timestamp was accepted and stopped the firer)."""
    yield
    for service in [*coordinator.services, *coordinator.everywhere]:
        await asyncio.wait_for(_one_more_step(service), CALL_TIMEOUT)
    assert_loops_healthy(coordinator)


async def _one_more_step(service: Service) -> None:
    steps = service.steps
    service.wake()
    await service.wait_until(lambda s: s.steps > steps)


def assert_loops_healthy(coordinator: Coordinator) -> None:
    failed = {
        s.name: repr(s.last_error)
        for s in [*coordinator.services, *coordinator.everywhere]
        if s.failures
    }
    assert not failed, f"a loop that serves every tenant failed: {failed}"


@pytest.fixture
async def channel(coordinator: Coordinator) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        coordinator.address,
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    ) as chan:
        yield chan


CANARY = task_service_pb2.SubmitTaskRequest(
    queue="canary", type="canary", payload=b'{"fine": true}', labels={"who": "bystander"}
)


async def with_bystander(
    channel: grpc.aio.Channel, service: str, name: str, request: Message
) -> tuple[Message | None, grpc.aio.AioRpcError | None]:
    """Sends ``request`` and, at the same moment, a well-formed submit that must succeed."""
    with no_server_errors(name):
        (response, error), (_, canary_error) = await asyncio.gather(
            call(channel, service, name, request),
            call(channel, "conveyor.v1.TaskService", "SubmitTask", CANARY),
        )
    assert canary_error is None, (
        f"a well-formed submit failed beside {name}: "
        f"{canary_error.code().name} {canary_error.details()!r}"
    )
    return response, error


@PROFILE
@given(request=requests(task_service_pb2.SubmitTaskRequest))
async def test_submit_task_answers_ok_or_a_documented_error(
    channel: grpc.aio.Channel, request: task_service_pb2.SubmitTaskRequest
) -> None:
    response, error = await with_bystander(
        channel, "conveyor.v1.TaskService", "SubmitTask", request
    )
    event(f"SubmitTask: {error.code().name if error else 'OK'}")
    if error is not None:
        assert_documented(error, "SubmitTask")
        return
    assert isinstance(response, task_service_pb2.SubmitTaskResponse)
    # What was accepted reads back as it was sent.
    got, get_error = await call(
        channel,
        "conveyor.v1.TaskService",
        "GetTask",
        task_service_pb2.GetTaskRequest(id=response.task.id),
    )
    assert get_error is None, get_error
    assert isinstance(got, task_service_pb2.GetTaskResponse)
    task = got.task
    assert task.type == request.type
    assert task.queue == (request.queue or "default")
    assert task.payload == request.payload
    assert dict(task.labels) == dict(request.labels)
    if request.content_type:
        assert task.content_type == request.content_type
    if request.idempotency_key and not response.deduplicated:
        assert task.idempotency_key == request.idempotency_key


@PROFILE
@given(
    tasks=st.lists(requests(task_service_pb2.SubmitTaskRequest), max_size=5),
)
async def test_submit_tasks_answers_ok_or_a_documented_error(
    channel: grpc.aio.Channel, tasks: list[task_service_pb2.SubmitTaskRequest]
) -> None:
    request = task_service_pb2.SubmitTasksRequest(tasks=tasks)
    response, error = await with_bystander(
        channel, "conveyor.v1.TaskService", "SubmitTasks", request
    )
    event(f"SubmitTasks: {error.code().name if error else 'OK'}")
    if error is not None:
        assert_documented(error, "SubmitTasks")
        return
    assert isinstance(response, task_service_pb2.SubmitTasksResponse)
    assert len(response.results) == len(tasks)


@PROFILE
@given(request=requests(schedule_pb2.CreateScheduleRequest))
async def test_create_schedule_answers_ok_or_a_documented_error(
    coordinator: Coordinator,
    channel: grpc.aio.Channel,
    request: schedule_pb2.CreateScheduleRequest,
) -> None:
    response, error = await with_bystander(
        channel, "conveyor.v1.TaskService", "CreateSchedule", request
    )
    event(f"CreateSchedule: {error.code().name if error else 'OK'}")
    if error is not None:
        assert_documented(error, "CreateSchedule")
        return
    assert isinstance(response, schedule_pb2.CreateScheduleResponse)
    # Accepted means usable: it reads back, the list with it too, it pauses and resumes,
    # the firer goes on, and it can be deleted again.
    name = response.schedule.name
    firer = coordinator.schedule_firer
    assert firer is not None
    await asyncio.wait_for(_one_more_step(firer), CALL_TIMEOUT)
    assert_loops_healthy(coordinator)
    for method, req in (
        ("GetSchedule", schedule_pb2.GetScheduleRequest(name=name)),
        ("ListSchedules", schedule_pb2.ListSchedulesRequest()),
        ("PauseSchedule", schedule_pb2.PauseScheduleRequest(name=name)),
        ("ResumeSchedule", schedule_pb2.ResumeScheduleRequest(name=name)),
        ("DeleteSchedule", schedule_pb2.DeleteScheduleRequest(name=name)),
    ):
        _, follow_error = await call(channel, "conveyor.v1.TaskService", method, req)
        assert follow_error is None, f"{method} of an accepted schedule: {follow_error}"


@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
@given(data=st.data())
async def test_every_unary_rpc_answers_ok_or_a_documented_error(
    coordinator: Coordinator, channel: grpc.aio.Channel, data: st.DataObject
) -> None:
    service, name = data.draw(st.sampled_from(UNARY_METHODS), label="rpc")
    request_cls, _ = _method(service, name)
    request = data.draw(requests(request_cls), label="request")
    _, error = await with_bystander(channel, service, name, request)
    event(f"{name}: {error.code().name if error else 'OK'}")
    if error is not None:
        assert_documented(error, name)
        return
    # What one call stored, every later reader must read: the lists of it answer.
    for method, req in READ_BACK.get(name, ()):
        _, read_error = await call(channel, service, method, req)
        assert read_error is None or read_error.code() in DOCUMENTED, (
            f"{method} after {name}: {read_error}"
        )
    assert_loops_healthy(coordinator)


# The lists that read what each writing call stored.
READ_BACK: dict[str, tuple[tuple[str, Message], ...]] = {
    "CreateApiKey": (("ListApiKeys", admin_service_pb2.ListApiKeysRequest(show_inactive=True)),),
    "UpdateTenantLimits": (("ListTenants", admin_service_pb2.ListTenantsRequest()),),
}


@PROFILE
@given(request=requests(task_service_pb2.WatchTaskRequest))
async def test_watch_task_answers_ok_or_a_documented_error(
    channel: grpc.aio.Channel, request: task_service_pb2.WatchTaskRequest
) -> None:
    watch = channel.unary_stream(
        "/conveyor.v1.TaskService/WatchTask",
        request_serializer=task_service_pb2.WatchTaskRequest.SerializeToString,
        response_deserializer=task_service_pb2.WatchTaskResponse.FromString,
    )
    stream = watch(request, timeout=CALL_TIMEOUT)
    try:
        await stream.read()
    except grpc.aio.AioRpcError as exc:
        assert_documented(exc, "WatchTask")
    finally:
        stream.cancel()


# -- the worker stream -------------------------------------------------------------------

# Codes a worker stream may end with because of what the worker sent.
STREAM_ENDINGS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _hello() -> st.SearchStrategy[worker_service_pb2.Hello]:
    """Hellos that are often well-formed (so the stream gets further) and often not."""
    good = st.builds(
        worker_service_pb2.Hello,
        protocol_version=st.just(1),
        worker_id=st.sampled_from(["prop-w1", "prop-w2"]),
        queues=st.just(["q1"]),
        task_types=st.just(["echo"]),
        credits=st.integers(0, 5),
    )
    return st.one_of(good, requests(worker_service_pb2.Hello))


def _lease() -> st.SearchStrategy[worker_service_pb2.Lease]:
    return st.one_of(
        st.builds(
            worker_service_pb2.Lease,
            task_id=st.uuids().map(str),
            attempt=st.integers(-2, 3),
            epoch=st.integers(-1, 3),
        ),
        requests(worker_service_pb2.Lease),
    )


def _worker_message() -> st.SearchStrategy[worker_service_pb2.ConnectRequest]:
    """Messages of each kind, mostly shaped like a worker's, with hostile fields."""
    result = st.builds(
        worker_service_pb2.TaskResult,
        lease=_lease(),
        outcome=st.integers(-1, 7),
        result=st.binary(max_size=32),
        error=st.text(max_size=20) | st.just("boom\x00"),
        retryable=st.booleans(),
    )
    return st.one_of(
        st.builds(
            worker_service_pb2.ConnectRequest,
            credit=st.builds(worker_service_pb2.Credit, credits=st.integers(-5, 200_000)),
        ),
        st.builds(
            worker_service_pb2.ConnectRequest,
            results=st.builds(worker_service_pb2.Results, results=st.lists(result, max_size=3)),
        ),
        st.builds(
            worker_service_pb2.ConnectRequest,
            heartbeat=st.builds(
                worker_service_pb2.Heartbeat, leases=st.lists(_lease(), max_size=3)
            ),
        ),
        requests(worker_service_pb2.ConnectRequest),
    )


@PROFILE
@given(hello=_hello(), messages=st.lists(_worker_message(), max_size=6))
async def test_worker_stream_survives_any_message_sequence(
    channel: grpc.aio.Channel,
    hello: worker_service_pb2.Hello,
    messages: list[worker_service_pb2.ConnectRequest],
) -> None:
    connect = channel.stream_stream(
        "/conveyor.v1.WorkerService/Connect",
        request_serializer=worker_service_pb2.ConnectRequest.SerializeToString,
        response_deserializer=worker_service_pb2.ConnectResponse.FromString,
    )

    async def sent() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        yield worker_service_pb2.ConnectRequest(hello=hello)
        for message in messages:
            yield message

    # Written by gRPC from an iterator: when the coordinator ends the stream early, the
    # rest is dropped and the read below gets the coordinator's status (a write of our
    # own after the end would replace it with a local INTERNAL error).
    with no_server_errors("Connect"):
        stream = connect(sent(), timeout=CALL_TIMEOUT)
        try:
            try:
                while await stream.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError:
                pass
            code = await stream.code()
            details = await stream.details()
            event(f"Connect ended with {code.name}")
            if code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
                # Our write raced the coordinator's end of the stream, and gRPC replaced its
                # status with a local one; no_server_errors still judges the coordinator.
                pass
            elif code != grpc.StatusCode.OK:
                assert code in STREAM_ENDINGS, f"Connect ended with {code.name}: {details!r}"
                assert_documented_status(code, await stream.trailing_metadata(), "Connect")
        finally:
            stream.cancel()
    # The coordinator still serves others.
    _, canary_error = await call(channel, "conveyor.v1.TaskService", "SubmitTask", CANARY)
    assert canary_error is None, canary_error
