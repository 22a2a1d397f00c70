"""The fencing token of an attempt (``ctx.fencing_token``), pure."""

from __future__ import annotations

import pytest

from conveyor.worker import TaskContext, fencing_token


def _ctx(epoch: int, attempt: int) -> TaskContext:
    return TaskContext(
        task_id="01900000-0000-7000-8000-000000000000", type="t", queue="q", attempt=attempt,
        max_attempts=3, idempotency_key="", deadline=None, labels={}, epoch=epoch,
    )  # fmt: skip


def test_every_later_attempt_has_a_larger_token() -> None:
    # A later attempt has a larger attempt number and an epoch at least as large (the
    # leader that leased it): its token is larger, whether the epoch moved or not.
    history = [(1, 1), (1, 2), (2, 3), (2, 4), (7, 5), (2**31 - 1, 6)]
    tokens = [fencing_token(epoch, attempt) for epoch, attempt in history]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert max(tokens) < 2**63  # a PostgreSQL bigint


def test_the_context_carries_its_attempts_token() -> None:
    ctx = _ctx(epoch=5, attempt=2)
    assert ctx.fencing_token == (5 << 32) | 2 == fencing_token(5, 2)


def test_ledger_and_locks_need_a_running_worker() -> None:
    ctx = _ctx(epoch=1, attempt=1)
    with pytest.raises(RuntimeError, match="running Worker"):
        _ = ctx.ledger
    with pytest.raises(RuntimeError, match="running Worker"):
        ctx.lock("name", 1.0)
