"""The checker of the distributed scenarios (tests/support/cluster.py), on fabricated rows.

A checker that cannot see a violation would let every scenario pass, so each kind of
violation is planted here and must be reported; a clean run must report nothing.
"""

from __future__ import annotations

from pathlib import Path

from cluster import (
    OUTCOME_SUCCEEDED,
    SUCCEEDED,
    AttemptRow,
    SubmitLog,
    TaskRow,
    evaluate,
    read_effects,
)

RUNNING = 3
PENDING = 1
OUTCOME_LEASE_EXPIRED = 5


def clean_run(
    n: int = 3,
) -> tuple[SubmitLog, list[TaskRow], list[AttemptRow], list[tuple[str, int]]]:
    """``n`` tasks acknowledged, each SUCCEEDED once on attempt 1, each run logged."""
    log = SubmitLog(run_id="run1", count=n)
    tasks: list[TaskRow] = []
    attempts: list[AttemptRow] = []
    effects: list[tuple[str, int]] = []
    for i in range(n):
        key, task_id = log.key(i), f"task-{i}"
        log.acknowledged[key] = task_id
        tasks.append(TaskRow(task_id, key, SUCCEEDED, attempt=1))
        attempts.append(AttemptRow(task_id, 1, OUTCOME_SUCCEEDED, "w1", epoch=1))
        effects.append((task_id, 1))
    return log, tasks, attempts, effects


def kinds(violations: list[str]) -> list[str]:
    return sorted(v.split(":", 1)[0] for v in violations)


def test_a_clean_run_has_no_violations() -> None:
    log, tasks, attempts, effects = clean_run()
    # Retried deliveries are allowed (at-least-once): a lease expired, attempt 2 won, and
    # the first run's effect happened too.
    tasks[0] = TaskRow("task-0", log.key(0), SUCCEEDED, attempt=2)
    attempts[0] = AttemptRow("task-0", 1, OUTCOME_LEASE_EXPIRED, "w1", epoch=1)
    attempts.append(AttemptRow("task-0", 2, OUTCOME_SUCCEEDED, "w2", epoch=2))
    effects.append(("task-0", 2))

    report = evaluate(log, tasks, attempts, effects)

    assert report.violations == []
    assert (report.acknowledged, report.tasks_in_scope, report.succeeded) == (3, 3, 3)
    assert report.repeated_effects == 1


def test_catches_a_lost_task() -> None:
    log, tasks, attempts, effects = clean_run()
    del tasks[1]  # acknowledged, then gone
    attempts = [a for a in attempts if a.task_id != "task-1"]
    effects = [e for e in effects if e[0] != "task-1"]

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["lost", "no effect"]
    assert "task-1" in violations[0] and log.key(1) in violations[0]


def test_catches_a_duplicate_success() -> None:
    log, tasks, attempts, effects = clean_run()
    # A fenced-off ex-leader's stale result applied next to the new leader's.
    attempts.append(AttemptRow("task-2", 2, OUTCOME_SUCCEEDED, "w2", epoch=2))
    effects.append(("task-2", 2))

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["double success"]
    assert "task-2 has 2 SUCCEEDED attempts" in violations[0]
    assert "epoch 1" in violations[0] and "epoch 2" in violations[0]


def test_catches_an_unacknowledged_extra() -> None:
    log, tasks, attempts, effects = clean_run()
    # A row with one of this run's keys that no submit was answered with, and a keyless
    # row of the run's type and queue: neither was ever acknowledged to anyone.
    tasks.append(TaskRow("ghost-1", log.key(7), PENDING))
    tasks.append(TaskRow("ghost-2", None, PENDING))

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["unacknowledged extra", "unacknowledged extra"]
    assert "ghost-1" in violations[0] and "ghost-2" in violations[1]


def test_catches_two_tasks_for_one_key() -> None:
    log, tasks, attempts, effects = clean_run()
    tasks.append(TaskRow("twin", log.key(0), SUCCEEDED, attempt=1))
    attempts.append(AttemptRow("twin", 1, OUTCOME_SUCCEEDED, "w1", epoch=1))
    effects.append(("twin", 1))

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["duplicate", "unacknowledged extra"]
    assert "key run1-000000 has 2 tasks" in violations[0]


def test_catches_unfinished_tasks_and_missing_effects() -> None:
    log, tasks, attempts, effects = clean_run()
    tasks[0] = TaskRow("task-0", log.key(0), RUNNING, attempt=2)
    attempts[0] = AttemptRow("task-0", 1, OUTCOME_LEASE_EXPIRED, "w1", epoch=1)
    effects.remove(("task-0", 1))

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["no effect", "unfinished"]
    assert any("task-0 ends RUNNING" in v for v in violations)


def test_catches_a_success_no_handler_run_explains() -> None:
    log, tasks, attempts, effects = clean_run()
    # The database says attempt 2 won, but only attempt 1's handler ever completed.
    tasks[1] = TaskRow("task-1", log.key(1), SUCCEEDED, attempt=2)
    attempts[1] = AttemptRow("task-1", 2, OUTCOME_SUCCEEDED, "w2", epoch=2)

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["phantom success"]


def test_catches_a_success_without_an_attempt_row() -> None:
    log, tasks, attempts, effects = clean_run()
    del attempts[2]

    assert kinds(evaluate(log, tasks, attempts, effects).violations) == ["bookkeeping"]


def test_given_up_submits() -> None:
    log, tasks, attempts, effects = clean_run()
    log.failed[log.key(5)] = "gave up after 60s: unavailable"
    log.failed[log.key(6)] = "gave up after 60s: unavailable"
    # Key 5's reply was lost after its commit: the row exists, nobody was told.
    tasks.append(TaskRow("late", log.key(5), PENDING))

    strict = evaluate(log, tasks, attempts, effects)
    assert kinds(strict.violations) == ["unacknowledged submit", "unacknowledged submit"]
    assert strict.committed_unacknowledged == 1

    lenient = evaluate(log, tasks, attempts, effects, allow_unacknowledged=True)
    assert lenient.violations == []


def test_one_task_acknowledged_under_two_keys() -> None:
    log, tasks, attempts, effects = clean_run()
    log.acknowledged[log.key(9)] = "task-0"

    violations = evaluate(log, tasks, attempts, effects).violations

    assert kinds(violations) == ["duplicate", "mismatch"]


def test_read_effects_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "effects.log"
    assert read_effects(path) == []
    path.write_text("a 1\nb 2\nc")  # a worker SIGKILLed mid-write
    assert read_effects(path) == [("a", 1), ("b", 2)]
