"""The KEDA scaler's backlog reads: a slow read is shared for 20 times as long as it took,
a fast one never, and only the most recently asked questions are kept."""

from __future__ import annotations

from conveyor.coordinator.api.keda_scaler import SharedBacklog
from conveyor.coordinator.store.tasks import Backlog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reader(clock: Clock, took: list[float]) -> tuple[SharedBacklog, list[tuple[str, ...]]]:
    asked: list[tuple[str, ...]] = []

    async def read(tenant: str, queues: tuple[str, ...], types: tuple[str, ...]) -> Backlog:
        asked.append(queues)
        clock.now += took[0]
        return Backlog(pending=len(asked), running=0, oldest_pending_age_seconds=1.0)

    return SharedBacklog(read, clock), asked


async def test_a_slow_read_is_reused_for_twenty_times_as_long_as_it_took() -> None:
    clock, took = Clock(), [1.0]  # a deep queue: the count took a second
    shared, asked = reader(clock, took)
    assert (await shared.get("acme", ("emails",), ())).pending == 1
    clock.now += 19.9
    assert (await shared.get("acme", ("emails",), ())).pending == 1  # every caller shares it
    assert (await shared.get("acme", ("sms",), ())).pending == 2  # another question is read
    clock.now += 0.2
    took[0] = 0.001  # drained: fast again
    assert (await shared.get("acme", ("emails",), ())).pending == 3
    assert (await shared.get("acme", ("emails",), ())).pending == 4  # a fast read: not reused
    assert asked == [("emails",), ("sms",), ("emails",), ("emails",)]


async def test_a_fast_read_is_never_reused() -> None:
    clock, took = Clock(), [SharedBacklog.SLOW / 2]
    shared, asked = reader(clock, took)
    for expected in (1, 2, 3):
        assert (await shared.get("acme", ("emails",), ("send",))).pending == expected
    assert len(asked) == 3


async def test_only_the_most_recently_asked_questions_are_kept() -> None:
    clock, took = Clock(), [1.0]
    shared, asked = reader(clock, took)
    shared.MAX_ENTRIES = 3  # 1,024 in use; three keep the test's clock within the reuse
    for queue in ("q0", "q1", "q2", "q3"):
        await shared.get("acme", (queue,), ())
    await shared.get("acme", ("q1",), ())  # still kept: reused
    assert asked == [("q0",), ("q1",), ("q2",), ("q3",)]
    await shared.get("acme", ("q0",), ())  # the least recently asked was dropped: read again
    assert asked[-1] == ("q0",) and len(asked) == 5
