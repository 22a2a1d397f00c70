"""Group commit: many concurrent callers, one transaction.

Callers enqueue items and await their own result; a flush takes everything queued (up
to ``max_batch``) and hands it to one ``flush`` call, which writes it in one transaction.
While a flush runs, new items pile up and go in the next one, so batches grow with load
and a lone item waits for no timer. A flush starts from the enqueue that finds a slot
free (or from the end of the flush before it), and takes its batch when it first runs, so
the items enqueued in the same turn of the event loop share it: one hop of the loop from
an item to its flush, where a flush loop woken by an event took two (each hop is a chance
for a busy machine to deschedule the process, and a lone submit's pickup latency makes
every hop of its path).

A bad item fails only its own caller. Validation keeps what PostgreSQL would refuse out of
a batch; should the store still refuse a whole flush, and the error proves the transaction
rolled back (the server reported it, the connection stayed up), the items are flushed
again one by one, so only the culprit's caller hears the error. A flush whose outcome is
unknown (the connection broke while it committed) is never retried: every caller of it
hears so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from conveyor.coordinator.errors import Overloaded, rolled_back

if TYPE_CHECKING:
    from conveyor.coordinator.deps import Deps

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("conveyor.coordinator.batcher")

FlushFn = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]
#: Told of each flush that succeeded: (batcher name, total weight, seconds it took).
FlushHook = Callable[[str, int, float], None]


class Batcher(Generic[T, R]):
    """Collects items and flushes them in batches, one flush at a time.

    ``flush`` returns one result per item, or an exception instance for an item that
    failed alone; an exception raised by ``flush`` fails the whole batch. Each item has a
    weight (a batch submit of 500 tasks weighs 500) and a batch holds at most ``max_batch``
    weight, except a single item heavier than that. ``on_flush`` is told of every flush
    that succeeded (for metrics).
    """

    def __init__(
        self,
        name: str,
        flush: FlushFn[T, R],
        *,
        max_batch: int,
        max_pending: int,
        concurrency: int = 1,
        on_flush: FlushHook | None = None,
        spacing: float = 0.0,
    ) -> None:
        self._name = name
        self._flush = flush
        self._on_flush = on_flush
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._queue: deque[tuple[T, int, asyncio.Future[R]]] = deque()
        self._pending_weight = 0
        self._running = False
        # Flushes in flight at once: more than one overlaps one transaction's round trips
        # with the next batch's, at the price of no ordering between batches.
        self._concurrency = concurrency
        self._flushes: set[asyncio.Task[None]] = set()
        # The flush started whose batch is not taken yet (it takes one when it runs).
        self._unstarted: asyncio.Task[None] | None = None
        # Seconds from one flush's taking of its batch to the next one's, at least (the
        # loop's clock); 0: none. A flush due sooner waits, and what arrives meanwhile
        # joins its batch; an item arriving after a quiet spell is flushed at once.
        self._spacing = spacing
        self._last_taken = float("-inf")
        self.isolations = 0
        """Flushes the store refused, retried item by item."""

    @property
    def pending(self) -> int:
        return self._pending_weight

    def start(self) -> None:
        self._running = True
        self._start_flushes()

    async def stop(self) -> None:
        """Flushes what is queued, then stops."""
        if not self._running:
            return
        self._running = False
        # Flushes in flight are not cancelled: a caller is never told "cancelled" about
        # a transaction that may have committed.
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        while self._queue:
            await self._flush_batch(self._take_batch())

    def enqueue(self, item: T, weight: int = 1) -> asyncio.Future[R]:
        """Queues one item; raises Overloaded when too much is waiting already."""
        if self._pending_weight + weight > self._max_pending and self._pending_weight > 0:
            raise Overloaded(f"{self._pending_weight} {self._name} operations are waiting")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, weight, future))
        self._pending_weight += weight
        self._start_flushes()
        return future

    async def submit(self, item: T, weight: int = 1) -> R:
        return await self.enqueue(item, weight)

    def _start_flushes(self) -> None:
        """Starts a flush for the queued items while a slot is free."""
        if (
            self._running
            and self._queue
            and self._unstarted is None
            and len(self._flushes) < self._concurrency
        ):
            flush = asyncio.create_task(self._flush_next(), name=f"batcher-{self._name}")
            self._unstarted = flush
            self._flushes.add(flush)
            flush.add_done_callback(self._flush_done)

    async def _flush_next(self) -> None:
        if self._spacing:
            loop = asyncio.get_running_loop()
            wait = self._last_taken + self._spacing - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # still unstarted: no other flush starts
            self._last_taken = loop.time()
        # The batch is taken now, not when the flush was started: what was enqueued in
        # the meantime (the same turn of the loop) goes in it too.
        self._unstarted = None
        if not self._queue:
            return
        batch = self._take_batch()
        self._start_flushes()  # what did not fit in this batch, in the next slot free
        await self._flush_batch(batch)

    def _flush_done(self, flush: asyncio.Task[None]) -> None:
        self._flushes.discard(flush)
        if self._unstarted is flush:
            self._unstarted = None  # cancelled before it ran
        if not flush.cancelled():
            # (Cancelled: the loop is being torn down; a new flush would outlive it.)
            self._start_flushes()

    def _take_batch(self) -> list[tuple[T, int, asyncio.Future[R]]]:
        batch: list[tuple[T, int, asyncio.Future[R]]] = []
        weight = 0
        while self._queue and (not batch or weight + self._queue[0][1] <= self._max_batch):
            entry = self._queue.popleft()
            batch.append(entry)
            weight += entry[1]
        self._pending_weight -= weight
        return batch

    async def _flush_batch(self, batch: list[tuple[T, int, asyncio.Future[R]]]) -> None:
        items = [entry[0] for entry in batch]
        started = time.perf_counter()
        try:
            results = await self._flush(items)
        except asyncio.CancelledError:
            for _, _, future in batch:
                if not future.done():
                    future.cancel()
            raise
        except Exception as exc:
            if len(batch) > 1 and rolled_back(exc):
                _log.warning(
                    "%s flush of %d items was refused (%s); flushing them one by one",
                    self._name,
                    len(items),
                    exc,
                )
                self.isolations += 1
                for entry in batch:
                    await self._flush_batch([entry])
                return
            # The whole batch failed: every caller hears why.
            _log.warning("%s flush of %d items failed: %s", self._name, len(items), exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self._on_flush is not None:
            weight = sum(entry[1] for entry in batch)
            self._on_flush(self._name, weight, time.perf_counter() - started)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def group_commit(
    name: str, flush: FlushFn[T, R], deps: Deps, *, concurrency: int = 1
) -> Batcher[T, R]:
    """A coordinator's group commit: bounded by its configuration (``max_batch``,
    ``max_pending_operations``), each flush timed by its metrics."""
    return Batcher(
        name,
        flush,
        max_batch=deps.config.max_batch,
        max_pending=deps.config.max_pending_operations,
        concurrency=concurrency,
        on_flush=deps.metrics.record_flush,
    )
