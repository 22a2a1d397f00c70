"""Quotas per tenant, pure (coordinator/quotas.py): limits over defaults, the token bucket,
and one check per submit call whatever its size, refusing before anything is counted."""

from __future__ import annotations

import math
import time
from typing import Any, cast

import pytest

from conveyor.coordinator.api.validation import NewTask
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.deps import Deps, Office
from conveyor.coordinator.dispatch.sessions import SessionRegistry
from conveyor.coordinator.errors import QuotaExceeded
from conveyor.coordinator.lifecycle.watchers import TaskWatchers
from conveyor.coordinator.store.db import Database
from conveyor.coordinator.tenancy.backlog import BacklogCounter
from conveyor.coordinator.tenancy.directory import Directory
from conveyor.coordinator.tenancy.quotas import Limits, Quotas, TokenBucket


class FakeDirectory:
    def __init__(self) -> None:
        self.limits: dict[str, dict[str, Any]] = {}
        self.listeners: list[Any] = []

    def on_tenant_change(self, listener: Any) -> None:
        self.listeners.append(listener)

    def set(self, tenant: str, **limits: Any) -> None:
        self.limits[tenant] = limits
        for listener in self.listeners:
            listener(tenant)


def _task(payload: bytes = b"") -> NewTask:
    return NewTask(
        queue="q", type="t", payload=payload, content_type="", priority=0, max_attempts=3,
        idempotency_key=None, request_hash=b"", run_at=None, timeout_ms=1, retry_initial_ms=1,
        retry_max_ms=1, retry_multiplier=2.0, retry_jitter=0.0, labels={}, traceparent="",
    )  # fmt: skip


def _quotas(**config: Any) -> tuple[Quotas, FakeDirectory]:
    cfg = CoordinatorConfig(dsn="postgresql://unused", **config)
    deps = Deps(
        config=cfg,
        db=cast(Database, None),
        office=Office("c"),
        sessions=SessionRegistry(),
        watchers=TaskWatchers(),
    )
    directory = FakeDirectory()
    return Quotas(cfg, cast(Directory, directory), BacklogCounter(deps)), directory


def test_a_tenants_limits_override_the_defaults_field_by_field() -> None:
    quotas, directory = _quotas(max_backlog=100, submit_rate=10.0, max_payload_bytes=1000)
    assert quotas.limits("acme") == Limits(
        max_backlog=100, submit_rate=10.0, max_payload_bytes=1000
    )
    directory.set("acme", max_backlog=5, submit_rate=None, max_schedules=0)
    assert quotas.limits("acme") == Limits(max_backlog=5, submit_rate=10.0, max_payload_bytes=1000)
    assert quotas.limits("other").max_backlog == 100
    assert quotas.backlog_limited()
    assert not _quotas()[0].backlog_limited()


def test_token_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [50.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    bucket = TokenBucket(rate=10.0, size=20)
    assert bucket.take(15) is None
    assert bucket.take(10) == pytest.approx(0.5)  # 5 left, 5 more take half a second
    assert bucket.tokens == pytest.approx(5)  # a refused take takes nothing
    now[0] += 0.5
    assert bucket.take(10) is None
    assert bucket.take(21) == math.inf  # never fits
    now[0] += 100
    assert bucket.take(20) is None  # refilled to the size, no more


def test_the_rate_is_per_call_and_per_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [50.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    quotas, _ = _quotas(submit_rate=100.0, submit_burst=500)
    quotas.admit("acme", [_task()] * 500)  # one call of 500: one check, 500 tokens
    quotas.done("acme", 500)
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("acme", [_task()])
    assert caught.value.subject == "submit_rate"
    assert caught.value.retry_after == pytest.approx(0.01)
    quotas.admit("globex", [_task()] * 500)  # another tenant has its own bucket
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("globex", [_task()] * 501)
    assert caught.value.retry_after is None and "smaller batches" in caught.value.message


def test_a_refused_submit_is_not_counted_in_the_backlog() -> None:
    quotas, _ = _quotas(max_backlog=3, submit_rate=1.0, submit_burst=2)
    quotas.admit("acme", [_task()] * 2)
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("acme", [_task()] * 2)  # over the backlog: no token taken either
    assert caught.value.subject == "max_backlog"
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("acme", [_task()])  # the bucket is empty
    assert caught.value.subject == "submit_rate"
    assert quotas.backlog.estimate("acme") == 2


def test_payload_size_per_tenant() -> None:
    quotas, directory = _quotas(max_payload_bytes=1000)
    quotas.admit("acme", [_task(b"x" * 1000)])
    directory.set("acme", max_payload_bytes=10)
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("acme", [_task(), _task(b"x" * 11)])
    assert caught.value.subject == "max_payload_bytes" and caught.value.retry_after is None
    quotas.check_payload("acme", 10)
    quotas.admit("globex", [_task(b"x" * 1000)])


async def test_a_tenant_that_ignores_retry_info_is_answered_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quotas, _ = _quotas(submit_rate=10.0, submit_burst=1)
    held: list[float] = []

    async def hold_back(seconds: float) -> None:
        held.append(seconds)

    monkeypatch.setattr("conveyor.coordinator.tenancy.quotas.hold_back", hold_back)
    async with quotas.admission("acme", [_task()]):
        pass
    for _ in range(3):
        with pytest.raises(QuotaExceeded):
            async with quotas.admission("acme", [_task()]):
                pass
    # The first refusal is answered at once; the next ones, sent before its RetryInfo ran
    # out, are held until it does.
    assert len(held) == 2 and all(0 < s <= 0.1 for s in held)
    # Another tenant is not held for acme's haste.
    async with quotas.admission("globex", [_task()]):
        pass
    assert quotas.backlog.estimate("acme") == 1


def test_firings_are_admitted_as_far_as_the_backlog_has_room() -> None:
    """A schedule firing is a submit: the firer asks once per tenant and batch, and as
    many firings as fit are admitted (the others are refused, with the limit)."""
    quotas, directory = _quotas()
    directory.set("t", max_backlog=3)
    quotas.backlog.counted = {"t": 2}
    assert quotas.admit_firings("t", 5) == (1, "max_backlog")
    assert quotas.admit_firings("t", 5) == (0, "max_backlog")
    assert quotas.admit_firings("other", 5) == (5, None)
    quotas.done("t", 1)
    with pytest.raises(QuotaExceeded):
        quotas.admit("t", [_task()])


def test_firings_take_what_the_bucket_holds() -> None:
    quotas, directory = _quotas()
    directory.set("t", submit_rate=0.001, submit_burst=2)
    assert quotas.admit_firings("t", 5) == (2, "submit_rate")
    assert quotas.admit_firings("t", 1) == (0, "submit_rate")
    with pytest.raises(QuotaExceeded) as caught:
        quotas.admit("t", [_task()])
    assert caught.value.subject == "submit_rate"
    assert quotas.limits_firings() and not _quotas()[0].limits_firings()


def test_take_up_to_takes_whole_tokens_only() -> None:
    bucket = TokenBucket(rate=0.001, size=3)
    assert bucket.take_up_to(2) == 2
    assert bucket.take_up_to(5) == 1
    assert bucket.take_up_to(5) == 0
