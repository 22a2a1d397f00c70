"""The coordinator process's garbage collector thresholds (``coordinator/server.py``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from conveyor.coordinator.server import FULL_COLLECTION_THRESHOLD, tune_garbage_collector


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
