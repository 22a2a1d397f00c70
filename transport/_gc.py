"""The garbage collector of a long-running Conveyor process, set once after start-up.

A full (generation 2) collection walks every tracked object of the process, and most of
them are the start-up heap: modules, protobuf descriptors, grpcio and asyncpg, which live
as long as the process. Measured in ``conveyor bench`` (gc callbacks timing each
collection, issue 19): the coordinator's full collections took 70-370 ms each on the
2-core VM, several per run, and a pickup that met one waited for it. Frozen (moved to the
permanent generation, :func:`gc.freeze`), the start-up heap is never walked again, and a
full collection walks only what the process made since.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Collects once, then freezes what survived: call when start-up is done.

    Objects made later are collected as usual; what was frozen is never freed, so call
    it once, after the imports and the set-up that lives as long as the process.
    """
    gc.collect()
    gc.freeze()
