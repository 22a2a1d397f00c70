"""CoordinatorConfig validates itself: ranges and the liveness/lease relations."""

from __future__ import annotations

import pytest

from conveyor.coordinator.config import MAX_MESSAGE_BYTES, ConfigError, CoordinatorConfig


def test_defaults_are_valid_and_leave_a_heartbeat_before_leases_expire() -> None:
    config = CoordinatorConfig(dsn="postgresql://x")
    assert config.worker_liveness_timeout == 20.0
    assert config.worker_liveness_timeout + config.heartbeat_interval <= config.lease_duration


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        # The worker would notice a silent leader only after its leases expired (issue 7.6).
        (
            {"heartbeat_interval": 10, "lease_duration": 30, "liveness_timeout": 31},
            "must not exceed",
        ),
        ({"heartbeat_interval": 10, "lease_duration": 25}, "at least two heartbeat intervals"),
        ({"heartbeat_interval": 0}, "heartbeat_interval must be between 0.001 and 86400"),
        ({"lease_duration": -1}, "lease_duration must be between"),
        # Edge values (issue 15): every setting has the one range of its kind (bounds.py).
        ({"lease_duration": 1e300}, "lease_duration must be between"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval must be between"),
        ({"keepalive_time": float("inf")}, "keepalive_time must be between"),
        ({"statement_timeout": 1e-9}, "statement_timeout must be between"),
        ({"liveness_timeout": 1e12}, "liveness_timeout must be between"),
        ({"submit_rate": 1e-300}, "submit_rate must be 0 .no limit. or between 0.001"),
        ({"submit_rate": float("nan")}, "submit_rate"),
        ({"auth_failure_rate": float("inf")}, "auth_failure_rate"),
        ({"submit_burst": 10**30}, "submit_burst must be 0 .no limit. or positive, at most"),
        ({"max_schedules": 2.5}, "max_schedules must be a whole number"),
        ({"liveness_timeout": -1}, "liveness_timeout"),
        ({"max_payload_bytes": MAX_MESSAGE_BYTES}, "max_payload_bytes"),
        ({"max_payload_bytes": 0}, "max_payload_bytes"),
        ({"pool_min_size": 5, "pool_max_size": 2}, "pool sizes"),
        ({"max_backlog": -5}, "max_backlog"),
        ({"dsn": ""}, "dsn is required"),
    ],
)
def test_invalid_settings_are_refused_naming_the_rule(
    settings: dict[str, object], fragment: str
) -> None:
    values: dict[str, object] = {"dsn": "postgresql://x", **settings}
    with pytest.raises(ConfigError, match=fragment):
        CoordinatorConfig(**values)  # type: ignore[arg-type]


def test_an_explicit_liveness_timeout_within_the_rules_is_kept() -> None:
    config = CoordinatorConfig(
        dsn="postgresql://x", heartbeat_interval=1, lease_duration=10, liveness_timeout=3
    )
    assert config.worker_liveness_timeout == 3


def test_the_bootstrap_tenant_is_a_valid_name() -> None:
    from conveyor.coordinator.tenancy.keys import generate

    key = generate()[1]
    assert CoordinatorConfig(dsn="x", bootstrap_key=key, bootstrap_tenant="ops").bootstrap_key
    for bad in ("", "a\x00b", "x" * 1000):
        with pytest.raises(ConfigError, match="bootstrap_tenant"):
            CoordinatorConfig(dsn="x", bootstrap_key=key, bootstrap_tenant=bad)
