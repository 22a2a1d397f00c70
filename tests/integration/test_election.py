"""Leader election against a real etcd member: the rules in coordinator/election.py."""

from __future__ import annotations

import asyncio

import aetcd
from etcd_servers import EtcdServer
from testsupport import eventually

from conveyor.coordinator.leader.election import Election, parse_endpoints

LEADER_KEY = b"/conveyor/test/leader"


class CountingElection(Election):
    """Counts the leader's checks that the key is still its own."""

    checks = 0

    async def _check_still_leader(self, client: aetcd.Client, lease: aetcd.leases.Lease) -> None:
        await super()._check_still_leader(client, lease)
        self.checks += 1


async def test_a_refused_candidate_leaves_the_next_leaders_key_alone(
    etcd_server: EtcdServer,
) -> None:
    """A wins the key but is slow to take office; its lease runs out and B wins and takes
    office. When A is then refused (a newer term is recorded), it must hand back only its
    own key: deleting B's would depose a healthy leader and force a needless failover."""
    endpoints = parse_endpoints(etcd_server.client_urls)
    host, port = endpoints[0]
    admin = aetcd.Client(host=host, port=port)
    a_won = asyncio.Event()
    b_led = asyncio.Event()
    b_deposed: list[str] = []

    async def a_elected(revision: int) -> bool:
        a_won.set()
        await b_led.wait()
        return False  # by now the store holds B's newer term

    async def a_deposed(reason: str) -> None:
        return None

    async def b_elected(revision: int) -> bool:
        b_led.set()
        return True

    async def b_lost(reason: str) -> None:
        b_deposed.append(reason)

    a = Election(
        endpoints,
        cluster="test",
        node_id="a",
        address="a:1",
        ttl=2,
        on_elected=a_elected,
        on_deposed=a_deposed,
    )
    b = CountingElection(
        endpoints,
        cluster="test",
        node_id="b",
        address="b:1",
        ttl=2,
        on_elected=b_elected,
        on_deposed=b_lost,
    )
    a.start()
    try:
        await asyncio.wait_for(a_won.wait(), 10)
        # A's key goes away as if its lease had expired while it was stalled.
        found = await admin.get(LEADER_KEY)
        assert found is not None
        await admin.revoke_lease(found.lease)
        b.start()
        await asyncio.wait_for(b_led.wait(), 10)

        checks_at_start = b.checks

        async def b_checked_twice() -> bool:
            return b.checks >= checks_at_start + 2

        async def a_handed_back() -> bool:
            # A's campaign returned (its refusal ran) once A campaigns again as a follower
            # and sees B as the leader.
            return a.leader is not None and a.leader.node_id == "b"

        await eventually(a_handed_back, timeout=10)
        # Give B's own check of the key (every TTL/8) time to run before judging.
        await eventually(b_checked_twice, timeout=10)
        assert b_deposed == [], f"the new leader was deposed: {b_deposed}"
        kept = await admin.get(LEADER_KEY)
        assert kept is not None, "the refused candidate deleted the new leader's key"
        assert b'"node_id": "b"' in kept.value
        assert b.leading
    finally:
        await a.stop()
        await b.stop()
        await admin.close()
