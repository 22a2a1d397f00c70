"""Leader election through etcd: one coordinator of a cluster leads at a time.

How it works (the rules the rest of the coordinator relies on):

- Every coordinator holds an etcd lease with a short TTL and keeps it alive. It registers
  itself under ``/conveyor/<cluster>/members/<node id>`` with that lease (so the member
  list is the live replicas).
- Campaign: a transaction on the single key ``/conveyor/<cluster>/leader`` — create it
  (bound to our lease) if it does not exist, else read it. The creator leads; the key's
  creation revision is the term's etcd revision, which only grows.
- Taking office: the winner records a new epoch in Postgres, refused unless its etcd
  revision is newer than the last recorded term (so a candidate that was paused between
  winning and writing cannot displace a newer leader). Every dispatch-side write checks
  that epoch in its own transaction (the fence), so an ex-leader writes nothing.
- Losing: a leader that cannot renew its lease within the TTL, measured from when it sent
  the last successful renewal, steps down before etcd could have let anyone else win.
  When etcd is unreachable there is no leader: nothing is dispatched until it returns.
- Followers poll the leader key (a few times per TTL) to learn the leader's address for
  redirects and to campaign as soon as the key is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aetcd

from conveyor.coordinator.store.leadership import UNSAFE_DISABLE_FENCING

_log = logging.getLogger("conveyor.coordinator.election")

# Seconds any one etcd call may take before the endpoint counts as unreachable.
CALL_TIMEOUT = 1.0


@dataclass(frozen=True)
class Member:
    """A coordinator as registered in etcd."""

    node_id: str
    address: str


def parse_endpoints(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    """``http://127.0.0.1:2379,http://127.0.0.1:22379`` -> [(host, port), ...]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"etcd endpoint {item!r} is not HOST:PORT or http://HOST:PORT")
        endpoints.append((parts.hostname, parts.port))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


class Election:
    """Campaigns for leadership of ``cluster`` and reports winning and losing it.

    ``on_elected(term_revision)`` is awaited when this node wins the key; it takes office
    (records the epoch in Postgres) and returns False if that was refused.
    ``on_deposed(reason)`` is awaited when this node stops leading for any reason.
    ``on_session(up)`` is told when this node's etcd session (its lease) is established
    (True) and when it is lost or closed (False), for metrics.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        cluster: str,
        node_id: str,
        address: str,
        ttl: float,
        on_elected: Callable[[int], Awaitable[bool]],
        on_deposed: Callable[[str], Awaitable[None]],
        on_session: Callable[[bool], None] | None = None,
    ) -> None:
        self._endpoints = list(endpoints)
        self._cluster = cluster
        self._node_id = node_id
        self._address = address
        self._ttl = max(1, round(ttl))
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._on_session = on_session
        self._prefix = f"/conveyor/{cluster}/".encode()
        self._leader_key = self._prefix + b"leader"
        self._member_key = self._prefix + b"members/" + node_id.encode()
        self._value = json.dumps({"node_id": node_id, "address": address}).encode()
        self._client: aetcd.Client | None = None
        self._lease: aetcd.leases.Lease | None = None
        self._lease_valid_until = 0.0
        self._endpoint_index = random.randrange(len(self._endpoints))
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.leading = False
        self.leader: Member | None = None
        """The leader as last seen in etcd (None when unknown)."""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="election")

    async def stop(self) -> None:
        """Resigns (deletes the key and revokes the lease, for a fast handover) and stops."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leading:
            self.leading = False
            await self._on_deposed("shutting down")
        if self._client is not None:
            with contextlib.suppress(Exception):
                if self._lease is not None:
                    await asyncio.wait_for(self._client.revoke_lease(self._lease.id), CALL_TIMEOUT)
            await self._close_client()

    async def members(self) -> list[Member]:
        """The live coordinators of the cluster (empty when etcd cannot be reached)."""
        if self._client is None:
            return []
        try:
            found = await asyncio.wait_for(
                self._client.get_prefix(self._prefix + b"members/"), CALL_TIMEOUT
            )
        except (aetcd.ClientError, TimeoutError):
            return []
        return [_member(kv.value) for kv in found if kv.value]

    # -- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._connect()
                failures = 0
                await self._campaign_forever()
            except asyncio.CancelledError:
                raise
            except (aetcd.ClientError, TimeoutError, OSError) as exc:
                failures += 1
                await self._lose(f"etcd unreachable ({type(exc).__name__}: {exc})")
                await self._close_client()
                delay = min(2.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                _log.warning("etcd call failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            except Exception:
                failures += 1
                await self._lose("election crashed")
                await self._close_client()
                _log.exception("election loop crashed; restarting it")
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))

    async def _connect(self) -> None:
        host, port = self._endpoints[self._endpoint_index % len(self._endpoints)]
        self._endpoint_index += 1
        client = aetcd.Client(host=host, port=port, timeout=CALL_TIMEOUT)
        await asyncio.wait_for(client.connect(), CALL_TIMEOUT)
        self._client = client
        sent = time.monotonic()
        lease = await asyncio.wait_for(client.lease(self._ttl), CALL_TIMEOUT)
        self._lease = lease
        self._lease_valid_until = sent + lease.ttl
        await asyncio.wait_for(client.put(self._member_key, self._value, lease=lease), CALL_TIMEOUT)
        _log.info("connected to etcd at %s:%d (lease ttl %ds)", host, port, lease.ttl)
        if self._on_session is not None:
            self._on_session(True)

    async def _campaign_forever(self) -> None:
        assert self._client is not None and self._lease is not None
        client, lease = self._client, self._lease
        # The leader renews four times per TTL. Followers look at the leader key twice as
        # often (a read is cheap) so they campaign soon after a dead leader's key expires;
        # they renew their own lease every other look.
        period = self._ttl / 8
        looks = 0
        while True:
            if self.leading or looks % 2 == 0:
                await self._renew(client, lease)
            looks += 1
            if not self.leading:
                await self._campaign(client, lease)
            else:
                await self._check_still_leader(client, lease)
            await asyncio.sleep(self._sleep_within_lease(period))

    def _sleep_within_lease(self, period: float) -> float:
        if not self.leading:
            return period
        # Wake in time to step down before the lease can have expired in etcd.
        margin = self._lease_valid_until - time.monotonic() - 0.05
        return max(0.0, min(2 * period, margin))

    async def _renew(self, client: aetcd.Client, lease: aetcd.leases.Lease) -> None:
        sent = time.monotonic()
        try:
            reply = await asyncio.wait_for(client.refresh_lease(lease.id), CALL_TIMEOUT)
        except (aetcd.ClientError, TimeoutError, OSError):
            if self.leading and time.monotonic() >= self._lease_valid_until - 0.05:
                await self._lose("could not renew the etcd lease in time")
            raise
        if reply is None or reply.TTL <= 0:
            await self._lose("the etcd lease expired")
            raise aetcd.ClientError("lease expired")
        # Counted from when the request left: etcd may have renewed it any time after.
        self._lease_valid_until = sent + reply.TTL

    async def _campaign(self, client: aetcd.Client, lease: aetcd.leases.Lease) -> None:
        txn = client.transactions
        won, responses = await asyncio.wait_for(
            client.transaction(
                compare=[txn.create(self._leader_key) == 0],
                success=[txn.put(self._leader_key, self._value, lease)],
                failure=[txn.get(self._leader_key)],
            ),
            CALL_TIMEOUT,
        )
        if not won:
            kvs = responses[0] if responses else []
            self.leader = _member(kvs[0][0]) if kvs else None
            return
        revision = int(responses[0].response_put.header.revision)
        self.leader = Member(self._node_id, self._address)
        _log.info("won the election for cluster %s at etcd revision %d", self._cluster, revision)
        if await self._on_elected(revision):
            self.leading = True
        else:
            # A newer term is already recorded in Postgres: hand the key back, but only
            # the key this campaign created. Taking office can take long enough for our
            # lease to expire and another node to win the key; deleting that node's key
            # would depose a healthy leader for nothing.
            await asyncio.wait_for(
                client.transaction(
                    compare=[txn.create(self._leader_key) == revision],
                    success=[txn.delete(self._leader_key)],
                    failure=[],
                ),
                CALL_TIMEOUT,
            )

    async def _check_still_leader(self, client: aetcd.Client, lease: aetcd.leases.Lease) -> None:
        found = await asyncio.wait_for(client.get(self._leader_key), CALL_TIMEOUT)
        if found is None or found.lease != lease.id:
            await self._lose("the leader key is no longer ours")

    async def _lose(self, reason: str) -> None:
        if UNSAFE_DISABLE_FENCING:
            # The fault switch models a leader that has not noticed it was replaced (a
            # long pause): only fencing could stop it, and fencing is off.
            _log.error("fault switch: not stepping down although %s", reason)
            return
        if self.leading:
            self.leading = False
            self.leader = None
            _log.warning("stepping down: %s", reason)
            await self._on_deposed(reason)

    async def _close_client(self) -> None:
        client, self._client, self._lease = self._client, None, None
        if self._on_session is not None:
            self._on_session(False)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CALL_TIMEOUT)


def _member(value: bytes) -> Member:
    data = json.loads(value)
    return Member(node_id=str(data.get("node_id", "")), address=str(data.get("address", "")))
