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
        ({"heartbeat_interval": 0}, "heartbeat_interval must be positive"),
        ({"lease_duration": -1}, "lease_duration must be positive"),
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
