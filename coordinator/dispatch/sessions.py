"""Connected worker sessions: who they are, what they can take, and their outboxes.

Nothing sent to one worker may wait for that worker. :meth:`WorkerSession.push` never
blocks: it queues the message in the session's bounded outbox, or, when the outbox is
full (the worker stopped reading), ends the session as evicted and says so. Assignments
never overflow it, because the dispatch policy claims no more bytes than the outbox has
room for. The stream's send loop (``worker_service.py``) takes messages out with
:meth:`WorkerSession.next_message`; whatever is still queued when a session ends never
reached the worker, and its assignments go back at once without using an attempt
(:meth:`WorkerSession.take_undelivered`).

Who a worker is: nothing its Hello says about itself (worker id, hostname, pid) proves
that it is the process that holds a session or a lease. Each session has a resume token
(:attr:`WorkerSession.resume_token`, 32 random bytes, told to the worker in Welcome and
kept across its reconnects): a Hello that presents it may replace the live session of its
worker id and resume the leases granted to it; the leases carry the token's hash
(``tasks.lease_holder``, :attr:`WorkerSession.holder`), so the proof holds across a
restart or failover of the coordinator.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import time
from collections.abc import Iterator, ValuesView
from dataclasses import dataclass, field

from conveyor.coordinator.api.validation import RESUME_TOKEN_BYTES
from conveyor.coordinator.convert import lease_proto
from conveyor.coordinator.lifecycle.leases import LeaseKey, lease_holder
from conveyor.coordinator.lifecycle.transitions import (
    ATTEMPT,
    EPOCH,
    ID,
    RUNNING,
    TENANT,
    WORKER_ID,
    Transitions,
)
from conveyor.v1 import task_pb2, worker_service_pb2

_log = logging.getLogger("conveyor.coordinator.sessions")

OUTBOX_MESSAGES = 1024
"""Messages queued for one worker before it counts as not reading. Assignments are bounded
by credit and bytes, acks by the worker's own messages in flight."""
OUTBOX_BYTES = 64 << 20
"""Assignment bytes (estimated) queued for one worker at most; the dispatch policy claims
within what is left."""
RECENT_EVICTIONS = 20
CANCELLED = task_pb2.TASK_STATE_CANCELLED


class Signal:
    """:class:`asyncio.Event`'s ``set``, ``clear``, ``is_set`` and ``wait``, with its list
    of waiters made only when one waits.

    An Event makes a deque at once (760 bytes with its first block); a session held two,
    1.5 KiB of each of 10,000 idle workers' sessions (issue 19), while the one is waited
    on only by a reconnect of the same worker and the other only by the send loop.
    """

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        """Sets it and wakes every waiter."""
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> None:
        """Returns once it is set (at once if it is); each waiter waits on a future of its
        own, so one cancelled leaves the others waiting."""
        if self._value:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters.remove(waiter)


@dataclass(frozen=True)
class Eviction:
    """A worker the coordinator cut off, for GetClusterStatus.recent_evictions."""

    worker_id: str
    hostname: str
    pid: int
    reason: str
    time: float
    released: int


@dataclass(eq=False, slots=True)
class WorkerSession:
    """One worker's stream: who it is, what it takes, and how much more it can take.

    Slotted: a ``__dict__`` of its 35 attributes was 1.6 KiB of each of 10,000 workers'
    sessions (issue 19)."""

    session_id: str
    worker_id: str
    tenant: str
    queues: tuple[str, ...]
    task_types: tuple[str, ...]
    """The types it has handlers for, in the order the worker named them."""
    hostname: str = ""
    """As the worker said in Hello: for people to read; it proves nothing."""
    pid: int = 0
    """As the worker said in Hello: for people to read; it proves nothing."""
    resume_token: bytes = field(
        default_factory=lambda: secrets.token_bytes(RESUME_TOKEN_BYTES), repr=False
    )
    """The secret of the worker process (see the module docstring); a new one unless the
    process proved an earlier one (:meth:`adopt`)."""
    holder: bytes = field(init=False, repr=False)
    """``lease_holder(resume_token)``: what the leases granted to this session record."""
    superseded: bool = False
    """A newer session of the same process took over before this one settled its leases:
    they are the newer one's now."""
    releasing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while this session's end releases its leases, so a newer session of the same
    process cannot take over halfway through (see :attr:`superseded`)."""
    encryption_keys: frozenset[str] | None = None
    """The encryption keys the worker opens (Hello, then EncryptionKeys messages, less
    those it reported lacking); None: it did not say, and is given every key's tasks."""
    credit: int = 0
    draining: bool = False
    loop_lag: float = 0.0
    """The event-loop lag the worker's last heartbeat reported, in seconds."""
    reports_lag: bool = False
    """Whether its heartbeats report a lag at all (an older or other SDK may not)."""
    unhealthy: str = ""
    """Why the worker is assigned nothing for now (``dispatch/health.py``); empty while it
    is healthy."""
    unhealthy_until: float = 0.0
    """When a worker marked for its error rate is tried again (monotonic); 0: not so marked."""
    recent_finished: float = 0.0
    recent_failed: float = 0.0
    """Attempts the worker's recent heartbeats reported ended, and failed (decayed counts)."""
    # Set when the dispatcher's last claim for this session came back short: nothing was
    # waiting for it, so a fresh submit may be handed to it directly.
    starving: bool = False
    # Set when the dispatcher left it out for lack of outbox room; the send loop wakes
    # the dispatcher when room frees up.
    throttled: bool = False
    connect_time: float = field(default_factory=time.time)
    closed: bool = False
    """No more messages are accepted (the stream is ending or ended)."""
    end_reason: str = ""
    eviction: str = ""
    """Why it was evicted, in a word: ``silent`` or ``not_reading`` (for metrics); empty
    while it is not."""
    write_stuck: bool = False
    """A write to the worker never finished (it reads nothing): no status can follow."""
    ended: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """Done when something ended the session from outside its stream."""
    done: Signal = field(default_factory=Signal)
    """Set once the stream handler finished with the session (its leases settled)."""
    _outbox: collections.deque[tuple[worker_service_pb2.ConnectResponse, int, bool]] = field(
        default_factory=collections.deque
    )
    _outbox_bytes: int = 0
    _has_mail: Signal = field(default_factory=Signal)
    _finishing: bool = False
    type_set: frozenset[str] = field(init=False)
    _kind: tuple[str, tuple[str, ...], frozenset[str], frozenset[str] | None] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def evicted(self) -> bool:
        return bool(self.eviction)

    def __post_init__(self) -> None:
        self.type_set = frozenset(self.task_types)
        self.holder = lease_holder(self.resume_token)

    def adopt(self, resume_token: bytes) -> None:
        """Takes the token a Hello proved (the process's), instead of the new one."""
        self.resume_token = resume_token
        self.holder = lease_holder(resume_token)

    @property
    def kind(self) -> tuple[str, tuple[str, ...], frozenset[str], frozenset[str] | None]:
        """What a claim for this session may take: its tenant, queues, task types and
        encryption keys. Two sessions of one kind are offered the same tasks, so once a
        claim for one finds less than it asked for, a claim for the other right after
        finds nothing (the dispatcher skips it for the rest of its round)."""
        # Made once per change of its keys, not per look (every dispatch round looks at
        # every session's).
        keys = self.encryption_keys
        kind = self._kind
        if kind is None or kind[3] is not keys:
            kind = self._kind = (self.tenant, self.queues, self.type_set, keys)
        return kind

    @property
    def wants_work(self) -> bool:
        return self.credit > 0 and not self.draining and not self.closed and not self.unhealthy

    @property
    def outbox_room(self) -> int:
        """Assignment bytes the outbox can take now."""
        return OUTBOX_BYTES - self._outbox_bytes

    def opens(self, encryption_key: str | None) -> bool:
        """Whether the worker can open a payload sealed with ``encryption_key`` (None: a
        payload that is not encrypted)."""
        keys = self.encryption_keys
        return encryption_key is None or keys is None or encryption_key in keys

    def proven_by(self, resume_token: bytes) -> bool:
        """Whether a Hello presenting ``resume_token`` comes from this session's process."""
        return bool(resume_token) and hmac.compare_digest(resume_token, self.resume_token)

    # -- the outbox ------------------------------------------------------------------------

    def push(
        self,
        message: worker_service_pb2.ConnectResponse,
        *,
        size: int = 0,
        assignments: bool = False,
    ) -> bool:
        """Queues a message for the worker without waiting; False when it will not be sent.

        ``size`` is the message's weight against :data:`OUTBOX_BYTES`; ``assignments``
        marks a message whose leases go back if it is never written.
        """
        if self.closed:
            return False
        if len(self._outbox) >= OUTBOX_MESSAGES:
            self.end(
                f"stopped reading its stream ({OUTBOX_MESSAGES} messages waiting)",
                evict="not_reading",
            )
            return False
        self._outbox.append((message, size, assignments))
        self._outbox_bytes += size
        self._has_mail.set()
        return True

    async def next_message(self) -> tuple[worker_service_pb2.ConnectResponse, int] | None:
        """The next message to write and its size (see :meth:`sent`); None once the
        session ended, or is finishing and everything queued was taken."""
        while not self._outbox or self.ended.done():
            if self._finishing or self.ended.done():
                return None
            self._has_mail.clear()
            await self._has_mail.wait()
        message, size, _ = self._outbox.popleft()
        return message, size

    def sent(self, size: int) -> None:
        """A message taken with :meth:`next_message` was written."""
        self._outbox_bytes -= size

    @property
    def outbox_empty(self) -> bool:
        return not self._outbox

    def take_undelivered(self) -> list[LeaseKey]:
        """Empties the outbox (the session is over); the leases of its assignments."""
        keys: list[LeaseKey] = []
        while self._outbox:
            message, size, assignments = self._outbox.popleft()
            self._outbox_bytes -= size
            if assignments:
                keys.extend(self.assigned(message))
        return keys

    def assigned(self, message: worker_service_pb2.ConnectResponse) -> list[LeaseKey]:
        """The lease keys of an Assignments message for this session."""
        tenant, worker_id = self.tenant, self.worker_id
        return [
            LeaseKey(tenant, a.lease.task_id, a.lease.attempt, a.lease.epoch, worker_id)
            for a in message.assignments.assignments
        ]

    # -- ending ----------------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """Takes no more messages; the stream ends once those queued are written."""
        self.closed = True
        self.end_reason = self.end_reason or reason
        self._finishing = True
        self._has_mail.set()

    def end(self, reason: str, *, evict: str = "") -> None:
        """Ends the session from outside its stream; the stream handler finishes it.

        ``evict`` names why the worker is evicted (``silent``, ``not_reading``); empty
        when it is not.
        """
        if self.closed and self.ended.done():
            return
        self.closed = True
        self.end_reason = self.end_reason or reason
        if evict and not self.eviction:
            self.eviction = evict
        if evict:
            _log.warning(
                "evicting worker %s: %s",
                self.worker_id,
                reason,
                extra={"worker_id": self.worker_id, "tenant": self.tenant},
            )
        if not self.ended.done():
            self.ended.set_result(None)
        self._has_mail.set()  # the send loop stops after the message it is writing


class SessionRegistry:
    """The live sessions, by session id and by (tenant, worker id), and the recent evictions.

    Worker ids are per tenant: a worker of one tenant can neither take nor learn of the id
    of another tenant's worker.
    """

    def __init__(self) -> None:
        self._by_session: dict[str, WorkerSession] = {}
        self._by_worker: dict[tuple[str, str], WorkerSession] = {}
        self._kinds: dict[object, list[WorkerSession]] | None = None
        self.evictions: collections.deque[Eviction] = collections.deque(maxlen=RECENT_EVICTIONS)

    def holder(self, tenant: str, worker_id: str) -> WorkerSession | None:
        """The session that holds ``worker_id`` (live, or still settling its leases after
        its end)."""
        return self._by_worker.get((tenant, worker_id))

    def reserve(self, session: WorkerSession) -> None:
        """Takes the session's worker id (the caller checked :meth:`holder` first)."""
        self._by_worker[session.tenant, session.worker_id] = session

    def activate(self, session: WorkerSession) -> None:
        """Makes the session visible to dispatch and status."""
        if not session.closed:
            self._by_session[session.session_id] = session
            self._kinds = None

    def retire(self, session: WorkerSession) -> None:
        """Hides an ended session from dispatch and status; it keeps its worker id until
        :meth:`remove` (its leases are not settled yet)."""
        session.closed = True
        if self._by_session.pop(session.session_id, None) is not None:
            self._kinds = None

    def remove(self, session: WorkerSession) -> None:
        """Frees the session's worker id (unless a newer session holds it already)."""
        self.retire(session)
        if self._by_worker.get((session.tenant, session.worker_id)) is session:
            del self._by_worker[session.tenant, session.worker_id]

    def rekeyed(self) -> None:
        """A live session's encryption keys changed (its :attr:`WorkerSession.kind`)."""
        self._kinds = None

    def by_kind(self) -> dict[object, list[WorkerSession]]:
        """The live sessions grouped by :attr:`WorkerSession.kind`, each group in the
        order they connected. Made again only after a session came, went or changed its
        keys, so a dispatch round with nothing new costs one look per kind, not per
        session. The caller must not change it."""
        kinds = self._kinds
        if kinds is None:
            kinds = {}
            for session in self._by_session.values():
                kinds.setdefault(session.kind, []).append(session)
            self._kinds = kinds
        return kinds

    def live(self) -> ValuesView[WorkerSession]:
        """The live sessions without a copy: for a caller that does not await while it
        walks them (iterating the registry copies it, 10,000 entries with as many
        workers)."""
        return self._by_session.values()

    def by_worker(self, tenant: str, worker_id: str) -> WorkerSession | None:
        """The live session of the tenant's ``worker_id``."""
        session = self._by_worker.get((tenant, worker_id))
        return session if session is not None and not session.closed else None

    def on_transitions(self, batch: Transitions) -> None:
        """Tells a worker to stop an attempt it runs that was cancelled (CancelTasks). A
        worker gone meanwhile finds out when its result is refused."""
        if not batch.entered(CANCELLED):
            return
        for row in batch.left(RUNNING):
            session = self.by_worker(row[TENANT], row[WORKER_ID]) if row[WORKER_ID] else None
            if session is not None:
                lease = lease_proto(row[ID], row[ATTEMPT], row[EPOCH])
                session.push(
                    worker_service_pb2.ConnectResponse(
                        cancel_tasks=worker_service_pb2.CancelTasks(leases=[lease])
                    )
                )

    def record_eviction(self, session: WorkerSession, released: int) -> None:
        self.evictions.appendleft(
            Eviction(
                worker_id=session.worker_id,
                hostname=session.hostname,
                pid=session.pid,
                reason=session.end_reason,
                time=time.time(),
                released=released,
            )
        )

    def __len__(self) -> int:
        return len(self._by_session)

    def __iter__(self) -> Iterator[WorkerSession]:
        return iter(list(self._by_session.values()))
