"""The coordinator process's garbage collector thresholds (``coordinator/server.py``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from conveyor.coordinator.server import (
    FULL_COLLECTION_THRESHOLD,
    collect_young,
    tune_garbage_collector,
)


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_full_collections_are_made_rarer_and_young_ones_are_left_alone(
    thresholds: tuple[int, int, int],
) -> None:
    young, middle, full = thresholds
    assert full < FULL_COLLECTION_THRESHOLD
    tune_garbage_collector()
    assert gc.get_threshold() == (young, middle, FULL_COLLECTION_THRESHOLD)


async def test_young_generations_are_collected_on_a_clock() -> None:
    # Issue 19: Python's own young collections wait for allocations less deallocations
    # to pass a threshold, which steady churn (each heartbeat's objects replacing the
    # last one's) hardly moves, so they came seldom and large. Here they come on time.
    collected = asyncio.Event()

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 1:
            collected.set()

    gc.disable()  # only the clock collects meanwhile
    gc.callbacks.append(seen)
    young = asyncio.create_task(collect_young(0.001))
    try:
        await asyncio.wait_for(collected.wait(), 10)
    finally:
        young.cancel()
        gc.callbacks.remove(seen)
        gc.enable()
