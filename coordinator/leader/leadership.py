"""Taking and leaving office: one coordinator's side of leadership.

With etcd endpoints the coordinator joins its cluster's election (``election.py``, whose
docstring has the rules) and leads only while it holds the etcd lease; otherwise it
answers with the leader's address. Without etcd it leads by itself: at start it takes a
new epoch in PostgreSQL, so a second coordinator started on the same database fences
this one off instead of racing it. Either way every dispatch-side write is fenced by the
epoch.

A term's services (dispatcher, promoter, reaper, schedule firer, backlog counter) are
started in order when the term begins and stopped in reverse when it ends, by one
:class:`~conveyor.coordinator.supervisor.Supervisor`. Leaving office (deposed, fenced,
or stopping) first stops dispatching (``Office.leader`` is False at once), then sends
the workers to the new leader, then stops the services.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


class Leadership:
    """This coordinator's terms (see the module docstring); a component of the server.

    ``step_down`` sends the connected workers to the new leader.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        node_id: str,
        address: str,
        pool: asyncpg.Pool,
        office: Office,
        metrics: CoordinatorMetrics,
        services: Sequence[Service],
        step_down: Callable[[], None],
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._address = address
        self._pool = pool
        self._office = office
        self._metrics = metrics
        self._services = services
        self._step_down = step_down
        self._term = Supervisor("term")
        self._election: Election | None = None
        self._changes: set[asyncio.Task[None]] = set()
        # Serialises taking and leaving office, which the election and fencing both do.
        self._lock = asyncio.Lock()
        office.on_fenced = self._fenced
        office.locate_leader = self.leader_address

    async def start(self) -> None:
        """Campaigns (etcd), or takes office at once (single-node)."""
        cfg = self._config
        if cfg.etcd:
            self._election = Election(
                parse_endpoints(cfg.etcd),
                cluster=cfg.cluster,
                node_id=self._node_id,
                address=self._address,
                ttl=cfg.election_ttl,
                on_elected=self._elected,
                on_deposed=self._deposed,
                on_session=self._metrics.etcd_session_changed,
            )
            self._election.start()
            _log.info(
                "coordinator %s serving on %s; campaigning in cluster %s",
                self._node_id,
                self._address,
                cfg.cluster,
            )
        else:
            await self._elected(None)
            _log.info(
                "coordinator %s serving on %s (single-node), epoch %d",
                self._node_id,
                self._address,
                self._office.epoch,
            )

    async def stop(self) -> None:
        """Resigns (so another replica takes over at once) and leaves office."""
        if self._election is not None:
            await self._election.stop()
        await self._term.stop()
        if self._office.leader:
            # Workers leave on their own (after their pending acknowledgements), instead
            # of holding the server's grace period and being cut.
            self._leave()
            self._step_down()
        await asyncio.gather(*self._changes, return_exceptions=True)

    # -- taking and leaving office -------------------------------------------------------

    async def _elected(self, term_revision: int | None) -> bool:
        """Takes office: records a new epoch in Postgres, then starts the term's services."""
        async with self._lock:
            async with self._pool.acquire() as conn:
                epoch = await leadership.take_office(
                    conn, self._config.cluster, self._node_id, self._address, term_revision
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
            self._office.epoch = epoch
            self._office.leader = True
            self._metrics.took_office(epoch)
            # The services' tasks copy this context: their log lines carry the epoch.
            with log_context(epoch=epoch):
                for service in self._services:
                    await self._term.start(service)
                _log.info(
                    "coordinator %s leads cluster %s, epoch %d",
                    self._node_id,
                    self._config.cluster,
                    epoch,
                )
            return True

    async def _deposed(self, reason: str) -> None:
        """Leaves office: stops dispatching at once, sends workers to the new leader."""
        async with self._lock:
            if not self._office.leader:
                return
            self._leave()
            _log.warning("coordinator %s no longer leads: %s", self._node_id, reason)
            self._step_down()
            await self._term.stop()

    def _fenced(self, exc: Fenced) -> None:
        """Another coordinator took a newer epoch: stop writing at once."""
        if not self._office.leader:
            return
        _log.error("%s; this coordinator steps down and stops dispatching", exc)
        # Stop dispatching before anything else runs; the rest of leaving office follows.
        self._leave()
        task = asyncio.get_running_loop().create_task(self._leave_fenced())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    async def _leave_fenced(self) -> None:
        async with self._lock:
            if self._office.leader:
                return  # elected again meanwhile
            self._step_down()
            await self._term.stop()

    def _leave(self) -> None:
        self._office.leader = False
        self._metrics.left_office()

    # -- what this coordinator knows -------------------------------------------------------

    def leader_address(self) -> str:
        if self._office.leader:
            return self._address
        if self._election is not None and self._election.leader is not None:
            return self._election.leader.address
        return ""

    def cluster_view(self) -> ClusterView:
        """What this coordinator knows about the cluster, for AdminService."""
        me = Member(self._node_id, self._address)
        leader: Member | None = me if self._office.leader else None
        if leader is None and self._election is not None:
            leader = self._election.leader
        return ClusterView(
            cluster=self._config.cluster,
            mode="etcd" if self._election is not None else "single-node",
            me=me,
            leader=leader,
            epoch=self._office.epoch,
        )

    async def replicas(self) -> list[Member]:
        if self._election is None:
            return [Member(self._node_id, self._address)]
        return await self._election.members()
