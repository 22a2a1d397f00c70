"""The work-ready relay's rules without a database (lifecycle/work_ready.py): a follower
notes what its commits made ready or scheduled, the leader wakes on other coordinators'
notifications only; tests/integration/test_followers.py has it over PostgreSQL."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.coordinator.deps import Office
from conveyor.coordinator.lifecycle.transitions import (
    COLUMNS,
    PENDING,
    RUN_AT,
    SCHEDULED,
    STATE,
    AfterCommit,
    Cause,
)
from conveyor.coordinator.lifecycle.work_ready import CHANNEL, WorkReadyRelay

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _row(state: int, run_at: datetime) -> tuple[object, ...]:
    row: list[object] = [None] * len(COLUMNS)
    row[STATE], row[RUN_AT] = state, run_at
    return tuple(row)


class Woken:
    def __init__(self) -> None:
        self.ready = 0
        self.scheduled: list[datetime] = []


def _relay(*, leader: bool) -> tuple[WorkReadyRelay, AfterCommit, Woken]:
    office = Office("test")
    office.leader = leader
    after_commit = AfterCommit()
    woken = Woken()

    def ready() -> None:
        woken.ready += 1

    relay = WorkReadyRelay(
        after_commit,
        "postgresql://unused",
        "me",
        office,
        ready=ready,
        scheduled=woken.scheduled.append,
    )
    return relay, after_commit, woken


def test_a_follower_notes_work_made_ready_and_the_earliest_run_at() -> None:
    relay, after_commit, _ = _relay(leader=False)
    later, sooner = NOW + timedelta(minutes=5), NOW + timedelta(minutes=1)
    after_commit.publish(Cause.SUBMITTED, [_row(SCHEDULED, later), _row(PENDING, NOW)])
    after_commit.publish(Cause.SUBMITTED, [_row(SCHEDULED, sooner)])
    pending, earliest = relay._take()
    assert (pending, earliest) == (True, sooner)
    assert json.loads(relay._payload(pending, earliest)) == {
        "n": "me",
        "p": 1,
        "r": sooner.timestamp(),
    }
    assert relay._take() == (False, None)  # said once
    # An infinite run_at (read as a naive datetime) is never due: nothing to say.
    after_commit.publish(Cause.SUBMITTED, [_row(SCHEDULED, datetime.max)])
    assert relay._take() == (False, None)


def test_the_leader_notes_nothing_its_own_listeners_have_it() -> None:
    relay, after_commit, _ = _relay(leader=True)
    after_commit.publish(Cause.SUBMITTED, [_row(PENDING, NOW)])
    assert relay._take() == (False, None)


def test_the_leader_wakes_on_other_coordinators_notifications_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay, _, woken = _relay(leader=True)
    due = NOW + timedelta(seconds=30)
    relay._notified(None, 1, CHANNEL, json.dumps({"n": "other", "p": 1}))
    relay._notified(None, 1, CHANNEL, json.dumps({"n": "other", "r": due.timestamp()}))
    relay._notified(None, 1, CHANNEL, json.dumps({"n": "me", "p": 1}))  # its own
    assert (woken.ready, woken.scheduled, relay.received) == (1, [due], 2)
    with caplog.at_level(logging.WARNING):
        relay._notified(None, 1, CHANNEL, "not json")
        relay._notified(None, 1, CHANNEL, json.dumps({"n": "other", "r": "soon"}))
        relay._notified(None, 1, CHANNEL, "[1, 2]")
    assert caplog.text.count("ignored a malformed") == 3


def test_a_follower_ignores_notifications() -> None:
    relay, _, woken = _relay(leader=False)
    relay._notified(None, 1, CHANNEL, json.dumps({"n": "other", "p": 1}))
    assert (woken.ready, woken.scheduled) == (0, [])
