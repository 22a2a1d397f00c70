"""The start-up heap frozen once (``transport/_gc.py``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from conveyor.transport._gc import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_what_lives_at_start_up_is_frozen_and_garbage_is_not() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    kept = [Cycle() for _ in range(10)]
    garbage = weakref.ref(Cycle())  # reachable only from itself
    gc.disable()  # no collection but the one under test
    try:
        assert gc.get_freeze_count() == 0
        freeze_startup_heap()
    finally:
        gc.enable()
    # Collected first, not made immortal; what is alive is frozen.
    assert garbage() is None
    assert gc.get_freeze_count() > len(kept)
    assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    # Objects made afterwards are collected as before.
    Cycle()
    assert gc.collect() >= 1
