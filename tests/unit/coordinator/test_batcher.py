"""Group commit (coordinator/batcher.py): batching, weights, backpressure, and a bad item
failing only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest

from conveyor.coordinator.errors import Overloaded
from conveyor.coordinator.lifecycle.batcher import Batcher


class FakeStore:
    """A flush that refuses any batch containing a poisoned item, the way PostgreSQL
    refuses a whole statement for one bad row."""

    def __init__(self, error: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.error = error or asyncpg.exceptions.CharacterNotInRepertoireError("NUL byte")

    async def flush(self, items: Sequence[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        await asyncio.sleep(0)
        if any(item.startswith("bad") for item in items):
            raise self.error
        return [item.upper() for item in items]


async def test_concurrent_items_share_a_flush() -> None:
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=100, max_pending=1000)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(f"i{n}") for n in range(20)))
    finally:
        await batcher.stop()
    assert results == [f"I{n}" for n in range(20)]
    assert len(store.batches) < 20  # they waited for one another, not for a timer


async def test_a_refused_batch_is_retried_item_by_item_so_only_the_culprit_fails() -> None:
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=100, max_pending=1000)
    batcher.start()
    try:
        items = [f"good{n}" for n in range(40)]
        items.insert(17, "bad")
        outcomes = await asyncio.gather(
            *(batcher.submit(item) for item in items), return_exceptions=True
        )
    finally:
        await batcher.stop()
    failed = [item for item, out in zip(items, outcomes, strict=True) if isinstance(out, Exception)]
    assert failed == ["bad"]
    assert batcher.isolations >= 1


async def test_an_unknown_outcome_is_never_retried() -> None:
    # The connection broke: the batch may have committed, so a retry could apply it twice.
    store = FakeStore(asyncpg.exceptions.ConnectionDoesNotExistError("lost mid-commit"))
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=100, max_pending=1000)
    batcher.start()
    try:
        outcomes = await asyncio.gather(
            batcher.submit("good1"), batcher.submit("bad"), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert all(isinstance(o, asyncpg.exceptions.ConnectionDoesNotExistError) for o in outcomes)
    assert batcher.isolations == 0
    assert sum(len(b) for b in store.batches) == 2


async def test_weights_bound_a_batch_and_the_queue() -> None:
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=3, max_pending=5)
    with pytest.raises(Overloaded):
        batcher.enqueue("a", 3)
        batcher.enqueue("b", 3)
    batcher.start()
    try:
        await asyncio.gather(batcher.submit("c", 2), batcher.submit("d", 1))
    finally:
        await batcher.stop()
    assert all(len(b) <= 2 for b in store.batches)


async def test_a_lone_item_is_flushed_on_the_next_turn_of_the_loop() -> None:
    # Every turn of the loop on a lone submit's path is pickup latency (issue 19): the
    # flush starts from the enqueue, not from a flush loop woken by it (two turns).
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=100, max_pending=1000)
    batcher.start()
    try:
        future = batcher.enqueue("a")
        batcher.enqueue("b")  # the same turn: the same flush
        await asyncio.sleep(0)
        assert store.batches == [["a", "b"]]
        assert await future == "A"
    finally:
        await batcher.stop()


async def test_flushes_run_side_by_side_up_to_the_concurrency() -> None:
    release, two_in_flight = asyncio.Event(), asyncio.Event()
    batches: list[list[str]] = []

    async def slow(items: Sequence[str]) -> list[str | BaseException]:
        batches.append(list(items))
        if len(batches) == 2:
            two_in_flight.set()
        await release.wait()
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher("t", slow, max_batch=2, max_pending=100, concurrency=2)
    batcher.start()
    try:
        futures = [batcher.enqueue(f"i{n}") for n in range(5)]
        await two_in_flight.wait()
        assert batches == [["i0", "i1"], ["i2", "i3"]]  # two in flight, the fifth waits
        release.set()
        assert await asyncio.gather(*futures) == [f"I{n}" for n in range(5)]
        assert batches[2:] == [["i4"]]
    finally:
        await batcher.stop()


async def test_stop_flushes_what_is_queued() -> None:
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher("t", store.flush, max_batch=1, max_pending=100)
    futures = [batcher.enqueue(f"i{n}") for n in range(3)]  # before start: nothing runs
    batcher.start()
    await batcher.stop()
    assert [f.result() for f in futures] == ["I0", "I1", "I2"]


async def test_with_spacing_a_flush_due_soon_waits_and_takes_what_arrives_meanwhile() -> None:
    # The first Hellos' batcher (issue 19): a storm shares one flush per spacing, and an
    # item after a quiet spell is taken at once.
    store = FakeStore()
    batcher: Batcher[str, str] = Batcher(
        "t", store.flush, max_batch=100, max_pending=1000, spacing=0.2
    )
    batcher.start()
    try:
        first = batcher.enqueue("a")
        await asyncio.sleep(0)  # the flush's first step runs in the next turn of the loop
        assert store.batches == [["a"]]  # nothing flushed before: taken at once
        assert await first == "A"
        later = [batcher.enqueue("b")]
        for _ in range(3):
            await asyncio.sleep(0)  # turns of the loop in which a flush without spacing ran
            later.append(batcher.enqueue(f"c{len(later)}"))
        assert await asyncio.gather(*later) == ["B", "C1", "C2", "C3"]
    finally:
        await batcher.stop()
    assert store.batches == [["a"], ["b", "c1", "c2", "c3"]]
