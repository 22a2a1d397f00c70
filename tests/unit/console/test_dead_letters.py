"""Dead tasks grouped by type and error fingerprint (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conveyor.client import Task, TaskState
from conveyor.console.dead_letters import group_page

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def dead(n: int, type_: str, error: str | None, minutes: int) -> Task:
    return Task(
        id=f"id-{n}",
        state=TaskState.DEAD,
        queue="q",
        type=type_,
        last_error=error,
        finish_time=T0 + timedelta(minutes=minutes),
    )


def test_groups_by_type_and_first_line_largest_first() -> None:
    trace = "\n\nTraceback (most recent call last):\n  File ..."
    groups = group_page(
        [
            dead(1, "charge", "CardDeclined: card 1 declined" + trace, 5),
            dead(2, "email", "Bounce: no such mailbox", 4),
            dead(3, "charge", "CardDeclined: card 1 declined" + trace + "other frame", 3),
            dead(4, "charge", "Timeout: bank", 2),
            dead(5, "email", None, 1),
        ]
    )
    assert [(g.type, g.fingerprint, g.count) for g in groups] == [
        ("charge", "CardDeclined: card 1 declined", 2),
        ("email", "Bounce: no such mailbox", 1),
        ("charge", "Timeout: bank", 1),
        ("email", "", 1),
    ]
    first = groups[0]
    assert first.task_ids == ("id-1", "id-3")
    assert (first.first_seen, first.last_seen) == (
        T0 + timedelta(minutes=3),
        T0 + timedelta(minutes=5),
    )
    assert not first.complete  # counted on the page only


def test_nothing_dead_no_group() -> None:
    assert group_page([]) == []
