"""Connected worker sessions, as the dispatcher and the API see them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from conveyor.v1 import worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.sessions")

# Messages waiting to be written to one worker's stream. Assignments are bounded by credit
# and acks by results in flight, so this only fills when the worker stops reading.
OUTBOX_SIZE = 1024


@dataclass(eq=False)
class WorkerSession:
    """One worker's stream: who it is, what it takes, and how much more it can take."""

    session_id: str
    worker_id: str
    tenant: str
    queues: tuple[str, ...]
    task_types: tuple[str, ...]
    hostname: str = ""
    pid: int = 0
    credit: int = 0
    draining: bool = False
    # Set when the dispatcher's last claim for this session came back short: nothing was
    # waiting for it, so a fresh submit may be handed to it directly.
    starving: bool = False
    connect_time: float = field(default_factory=time.time)
    closed: bool = False
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_SIZE)
    )

    @property
    def wants_work(self) -> bool:
        return self.credit > 0 and not self.draining and not self.closed

    async def send(self, message: worker_service_pb2.ConnectResponse) -> None:
        if not self.closed:
            await self.outbox.put(message)


class SessionRegistry:
    """The live sessions, by session id and by worker id."""

    def __init__(self) -> None:
        self._by_session: dict[str, WorkerSession] = {}
        self._by_worker: dict[str, WorkerSession] = {}
        self._rotation = itertools.count()

    def add(self, session: WorkerSession) -> WorkerSession | None:
        """Registers a session; returns (and retires) an older session of the same worker."""
        previous = self._by_worker.get(session.worker_id)
        if previous is not None:
            self.remove(previous)
        self._by_session[session.session_id] = session
        self._by_worker[session.worker_id] = session
        return previous

    def remove(self, session: WorkerSession) -> None:
        session.closed = True
        self._by_session.pop(session.session_id, None)
        if self._by_worker.get(session.worker_id) is session:
            del self._by_worker[session.worker_id]

    def by_worker(self, worker_id: str) -> WorkerSession | None:
        return self._by_worker.get(worker_id)

    def __len__(self) -> int:
        return len(self._by_session)

    def __iter__(self) -> Iterator[WorkerSession]:
        return iter(list(self._by_session.values()))

    def wanting_work(self) -> list[WorkerSession]:
        """Sessions with free credit, in an order that rotates so no worker is starved."""
        ready = [s for s in self._by_session.values() if s.wants_work]
        if len(ready) > 1:
            shift = next(self._rotation) % len(ready)
            ready = ready[shift:] + ready[:shift]
        return ready
