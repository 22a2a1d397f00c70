"""Taking and leaving office: one coordinator's side of leadership.

With etcd endpoints the coordinator joins its cluster's election (``election.py``, whose
docstring has the rules) and leads only while it holds the etcd lease; otherwise it
answers with the leader's address. Without etcd it leads by itself: at start it takes a
new epoch in PostgreSQL, so a second coordinator started on the same database fences
this one off instead of racing it. Either way every dispatch-side write is fenced by the
epoch.

A term's services (dispatcher, promoter, reaper, schedule firer, webhooks) are
started in order when the term begins and stopped in reverse when it ends, by one
:class:`~conveyor.coordinator.supervisor.Supervisor`. Leaving office (deposed, fenced,
or stopping) first stops dispatching (``Office.leader`` is False at once), then sends
the workers to the new leader, then stops the services.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from conveyor.coordinator.config import CoordinatorConfig
from conveyor.coordinator.deps import Office
from conveyor.coordinator.errors import Fenced
from conveyor.coordinator.leader.election import Election, Member, parse_endpoints
from conveyor.coordinator.store import leadership
from conveyor.coordinator.supervisor import Service, Supervisor
from conveyor.observability.logs import log_context
from conveyor.observability.metrics import CoordinatorMetrics

_log = logging.getLogger("conveyor.coordinator")


@dataclass(frozen=True)
class ClusterView:
    """What one coordinator knows about its cluster."""

    cluster: str
    mode: str
    me: Member
    leader: Member | None
    epoch: int


@dataclass(eq=False)
class Leadership:
    """This coordinator's terms (see the module docstring); a component of the server.

    ``step_down`` sends the connected workers to the new leader.
    """

    config: CoordinatorConfig
    node_id: str
    address: str
    pool: asyncpg.Pool
    office: Office
    metrics: CoordinatorMetrics
    services: Sequence[Service]
    step_down: Callable[[], None]
    _term: Supervisor = field(init=False, default_factory=lambda: Supervisor("term"))
    _election: Election | None = field(init=False, default=None)
    _changes: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    # Serialises taking and leaving office, which the election and fencing both do.
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.office.on_fenced = self._fenced
        self.office.locate_leader = self.leader_address

    async def start(self) -> None:
        """Campaigns (etcd), or takes office at once (single-node)."""
        cfg = self.config
        if cfg.etcd:
            self._election = Election(
                parse_endpoints(cfg.etcd),
                cluster=cfg.cluster,
                node_id=self.node_id,
                address=self.address,
                ttl=cfg.election_ttl,
                on_elected=self._elected,
                on_deposed=self._deposed,
                on_session=self.metrics.etcd_session_changed,
            )
            self._election.start()
            _log.info(
                "coordinator %s serving on %s; campaigning in cluster %s",
                self.node_id,
                self.address,
                cfg.cluster,
            )
        else:
            await self._elected(None)
            _log.info(
                "coordinator %s serving on %s (single-node), epoch %d",
                self.node_id,
                self.address,
                self.office.epoch,
            )

    async def stop(self) -> None:
        """Resigns (so another replica takes over at once) and leaves office."""
        if self._election is not None:
            await self._election.stop()
        await self._term.stop()
        if self.office.leader:
            # Workers leave on their own (after their pending acknowledgements), instead
            # of holding the server's grace period and being cut.
            self._leave()
            self.step_down()
        await asyncio.gather(*self._changes, return_exceptions=True)

    # -- taking and leaving office -------------------------------------------------------

    async def _elected(self, term_revision: int | None) -> bool:
        """Takes office: records a new epoch in Postgres, then starts the term's services."""
        async with self._lock:
            async with self.pool.acquire() as conn:
                epoch = await leadership.take_office(
                    conn, self.config.cluster, self.node_id, self.address, term_revision
                )
            if epoch is None:
                _log.warning(
                    "won etcd at revision %s but a newer term is recorded; not leading",
                    term_revision,
                )
                return False
            # Loops of an earlier term may still run (fenced, and elected again before
            # leaving office finished): end them so each loop runs once.
            await self._term.stop()
            self.office.epoch = epoch
            self.office.leader = True
            self.metrics.took_office(epoch)
            # The services' tasks copy this context: their log lines carry the epoch.
            with log_context(epoch=epoch):
                for service in self.services:
                    await self._term.start(service)
                _log.info(
                    "coordinator %s leads cluster %s, epoch %d",
                    self.node_id,
                    self.config.cluster,
                    epoch,
                )
            return True

    async def _deposed(self, reason: str) -> None:
        """Leaves office: stops dispatching at once, sends workers to the new leader."""
        async with self._lock:
            if not self.office.leader:
                return
            self._leave()
            _log.warning("coordinator %s no longer leads: %s", self.node_id, reason)
            self.step_down()
            await self._term.stop()

    def _fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: stop writing at once."""
        if not self.office.leader:
            return
        _log.error("%s; this coordinator steps down and stops dispatching", exc)
        # Stop dispatching before anything else runs; the rest of leaving office follows.
        self._leave()
        task = asyncio.get_running_loop().create_task(self._leave_fenced())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    async def _leave_fenced(self) -> None:
        async with self._lock:
            if self.office.leader:
                return  # elected again meanwhile
            self.step_down()
            await self._term.stop()

    def _leave(self) -> None:
        self.office.leader = False
        self.metrics.left_office()

    # -- what this coordinator knows -------------------------------------------------------

    def leader_address(self) -> str:
        if self.office.leader:
            return self.address
        if self._election is not None and self._election.leader is not None:
            return self._election.leader.address
        return ""

    def cluster_view(self) -> ClusterView:
        """What this coordinator knows about the cluster, for AdminService."""
        me = Member(self.node_id, self.address)
        leader: Member | None = me if self.office.leader else None
        if leader is None and self._election is not None:
            leader = self._election.leader
        return ClusterView(
            cluster=self.config.cluster,
            mode="etcd" if self._election is not None else "single-node",
            me=me,
            leader=leader,
            epoch=self.office.epoch,
        )

    async def replicas(self) -> list[Member]:
        if self._election is None:
            return [Member(self.node_id, self.address)]
        return await self._election.members()
