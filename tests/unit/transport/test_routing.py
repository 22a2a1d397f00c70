"""The routing table names real methods, and the client reads method names from picks."""

from __future__ import annotations

from conveyor.client._channel import method_name
from conveyor.transport._routing import ANY_COORDINATOR, SPREAD
from conveyor.v1 import (
    admin_service_pb2,
    effects_service_pb2,
    task_service_pb2,
    task_type_service_pb2,
    webhook_service_pb2,
)

_FILES = (
    admin_service_pb2,
    effects_service_pb2,
    task_service_pb2,
    task_type_service_pb2,
    webhook_service_pb2,
)


def _all_methods() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for module in _FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_method_of_the_table_exists() -> None:
    # A misspelt name would make a follower refuse, or the client not spread, silently.
    assert _all_methods() >= ANY_COORDINATOR
    assert SPREAD <= ANY_COORDINATOR


def test_what_only_the_leader_knows_or_changes_is_never_spread() -> None:
    leader_only = {
        "/conveyor.v1.TaskService/ListWorkers",
        "/conveyor.v1.TaskService/CancelTask",
        "/conveyor.v1.TaskService/PauseQueue",
        "/conveyor.v1.TaskService/CreateSchedule",
        "/conveyor.v1.AdminService/DrainWorker",
    }
    assert not leader_only & ANY_COORDINATOR


def test_a_pick_reads_as_its_methods_full_name() -> None:
    assert method_name(lambda s: s.tasks.GetTask) == "/conveyor.v1.TaskService/GetTask"
    assert method_name(lambda s: s.webhooks.ListWebhooks) == (
        "/conveyor.v1.WebhookService/ListWebhooks"
    )

    def admin(stub: object) -> object:
        return stub.GetClusterStatus  # type: ignore[attr-defined]

    assert method_name(lambda s: admin(s.admin)) == "/conveyor.v1.AdminService/GetClusterStatus"
    # Anything but a plain pick routes as before (to the usual address).
    assert method_name(lambda s: s.tasks.GetTask(None)) is None  # type: ignore[arg-type]
