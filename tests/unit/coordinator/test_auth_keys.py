"""API keys and scopes, pure (coordinator/api_keys.py): the key format and its hash, and the
one table of the scope each RPC needs, read off the protos' service descriptors."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import conveyor.v1
from conveyor.coordinator.tenancy import keys as api_keys
from conveyor.v1 import auth_pb2

# What the issue names for each scope; a new RPC must be placed here too (the test below
# fails for one that is not).
EXPECTED = {
    "TaskService": {
        "SubmitTask": "submit", "SubmitTasks": "submit", "CreateSchedule": "submit",
        "UpdateSchedule": "submit", "DeleteSchedule": "submit", "UpdateTask": "submit",
        "GetTask": "read", "ListTasks": "read", "WatchTask": "read", "ListQueues": "read",
        "ListWorkers": "read",
        "WatchTasks": "read",
        "GetSchedule": "read", "ListSchedules": "read", "ListRateLimits": "read",
        "CancelTask": "operate", "RetryTask": "operate", "PauseSchedule": "operate",
        "ResumeSchedule": "operate", "SetRateLimit": "operate", "DeleteRateLimit": "operate",
        # Queue operations (issue 17): tenant-scoped like the calls above.
        "ListDeadTasks": "read", "ListDeadTaskGroups": "read", "PauseQueue": "operate",
        "ResumeQueue": "operate", "RetryTasks": "operate", "DeleteTasks": "operate",
    },
    "WorkerService": {"Connect": "worker"},
    # Issue 18: the ledger is the handlers'; locks are for handlers and applications alike,
    # under the one scope a worker key has.
    "LedgerService": {"RecordEffect": "worker", "GetEffect": "worker"},
    "LockService": {"AcquireLock": "worker", "RenewLock": "worker", "ReleaseLock": "worker"},
    "AdminService": {
        "GetClusterStatus": "admin", "CreateApiKey": "admin", "ListApiKeys": "admin",
        "RevokeApiKey": "admin", "GetTenant": "admin", "ListTenants": "admin",
        "UpdateTenantLimits": "admin", "ListAuditEvents": "admin", "DrainWorker": "admin",
    },
    "WebhookService": {
        "CreateWebhook": "operate", "ListWebhooks": "read", "DeleteWebhook": "operate",
        "ListWebhookDeliveries": "read", "ReplayWebhookDeliveries": "operate",
    },
    "TaskTypeService": {
        "SetTaskType": "operate", "GetTaskType": "read", "ListTaskTypes": "read",
        "DeleteTaskType": "operate",
    },
}  # fmt: skip


def _every_method() -> dict[str, object]:
    """Every method of every service in every conveyor.v1 module, walked independently."""
    found: dict[str, object] = {}
    for info in pkgutil.iter_modules(conveyor.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"conveyor.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = method
    return found


def test_every_rpc_names_a_scope_and_the_table_is_the_issues() -> None:
    methods = _every_method()
    table = api_keys.required_scopes()
    assert set(table) == set(methods), "an RPC without (required_scope), or a stale table"
    expected = {
        f"/conveyor.v1.{service}/{name}": scope
        for service, names in EXPECTED.items()
        for name, scope in names.items()
    }
    assert table == expected


def test_a_method_without_a_scope_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    class Options:
        Extensions = {auth_pb2.required_scope: auth_pb2.SCOPE_UNSPECIFIED}

    class Method:
        name = "NewThing"

        def GetOptions(self) -> Options:
            return Options()

    class Service:
        full_name = "conveyor.v1.Extra"
        methods = [Method()]

    class Descriptor:
        services_by_name = {"Extra": Service()}

    class Module:
        DESCRIPTOR = Descriptor()

    api_keys.required_scopes.cache_clear()
    monkeypatch.setattr(api_keys, "_api_modules", lambda: [Module()])
    try:
        with pytest.raises(RuntimeError, match=r"/conveyor.v1.Extra/NewThing"):
            api_keys.required_scopes()
    finally:
        api_keys.required_scopes.cache_clear()


def test_streaming_methods() -> None:
    assert api_keys.streaming_methods() == {
        "/conveyor.v1.TaskService/WatchTask",
        "/conveyor.v1.TaskService/WatchTasks",
        "/conveyor.v1.WorkerService/Connect",
    }


def test_keys_are_random_well_formed_and_hashed() -> None:
    made = {api_keys.generate() for _ in range(200)}
    assert len({key_id for key_id, _ in made}) == 200
    for key_id, key in made:
        assert key.startswith(f"cvk_{key_id}_") and len(key) == api_keys.MAX_KEY_LENGTH
        assert api_keys.parse(key) == key_id
        digest = api_keys.secret_hash(key)
        assert len(digest) == 32 and key.encode() not in digest
        assert api_keys.secret_matches(key, digest)
        assert not api_keys.secret_matches(key[:-1] + ("A" if key[-1] != "A" else "B"), digest)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "cvk_",
        "Bearer cvk_abcdefghijkl_" + "a" * 43,
        "cvk_ABCDEFGHIJKL_" + "a" * 43,  # the id is lower case
        "cvk_abcdefghijk1_" + "a" * 43,  # 1 is not base32
        "cvk_abcdefghijkl_" + "a" * 42,
        "cvk_abcdefghijkl_" + "a" * 44,
        "cvk_abcdefghijkl_" + "a" * 42 + "=",
        "https://host/?key=cvk_abcdefghijkl_" + "a" * 43,
        "cvk_abcdefghijkl_" + "a" * 43 + "\n",
        "x" * 20_000,
    ],
)
def test_anything_but_a_whole_key_is_no_key(token: str) -> None:
    assert api_keys.parse(token) is None


def test_scope_names_and_values() -> None:
    assert api_keys.ALL_SCOPES == ("submit", "read", "operate", "worker", "admin")
    for name in api_keys.ALL_SCOPES:
        assert api_keys.scope_name(api_keys.scope_value(name)) == name
    with pytest.raises(ValueError, match="the scopes are submit, read"):
        api_keys.scope_value("write")
    with pytest.raises(ValueError):
        api_keys.scope_name(auth_pb2.SCOPE_UNSPECIFIED)
    assert api_keys.normalize_scopes(["admin", "read", "read"]) == ("read", "admin")
