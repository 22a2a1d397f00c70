"""The dispatch policy's pure parts: who takes what, the order of a round, the portions,
and Assignments messages bounded by bytes (coordinator/dispatch_policy.py)."""

from __future__ import annotations

from typing import Any

from conveyor.coordinator.dispatch import policy as dispatch_policy
from conveyor.coordinator.dispatch.concurrency import KEYED_STICKY, ConcurrencyKeys
from conveyor.coordinator.dispatch.policy import (
    MAX_CLAIM_BYTES,
    MAX_CLAIM_PER_SESSION,
    MESSAGE_BYTES,
    DispatchPolicy,
)
from conveyor.coordinator.dispatch.sessions import OUTBOX_BYTES, WorkerSession
from conveyor.coordinator.store.tasks import last_key
from conveyor.v1 import worker_service_pb2


def _session(name: str, credit: int = 10, **fields: Any) -> WorkerSession:
    values: dict[str, Any] = {
        "session_id": name,
        "worker_id": name,
        "tenant": "t",
        "queues": ("q",),
        "task_types": ("a",),
        "credit": credit,
        **fields,
    }
    return WorkerSession(**values)


async def test_a_session_takes_only_its_tenant_queues_and_types() -> None:
    session = _session("w", queues=("q", "r"), task_types=("a", "b"))
    assert dispatch_policy.takes(session, "t", "r", "b")
    assert not dispatch_policy.takes(session, "t", "q", "c")  # a type it has no handler for
    assert not dispatch_policy.takes(session, "t", "s", "a")
    assert not dispatch_policy.takes(session, "other", "q", "a")
    closed = _session("gone", closed=True)
    assert dispatch_policy.unserved([closed], "t", "q", "a", None) == (True, "")
    assert dispatch_policy.unserved([closed, session], "t", "q", "a", None) == (False, "")


async def test_a_round_rotates_and_portions_by_credit_count_and_room() -> None:
    policy = DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20)
    sessions = [
        _session("a", credit=3),
        _session("b", credit=10_000),
        _session("idle", credit=0),
        _session("draining", credit=5, draining=True),
    ]
    first = policy.plan(sessions)
    second = policy.plan(sessions)
    assert [c.session.worker_id for c in first] != [c.session.worker_id for c in second]
    assert sorted(c.session.worker_id for c in first) == ["a", "b"]
    portions = {c.session.worker_id: (c.limit, c.max_bytes) for c in first}
    assert portions == {"a": (3, MAX_CLAIM_BYTES), "b": (MAX_CLAIM_PER_SESSION, MAX_CLAIM_BYTES)}


async def test_a_session_whose_outbox_is_full_is_left_out_until_it_drains() -> None:
    policy = DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20)
    session = _session("slow")
    message = worker_service_pb2.ConnectResponse()
    assert session.push(message, size=OUTBOX_BYTES - 1000, assignments=True)
    (claim,) = policy.plan([session])
    assert claim.max_bytes == 1000
    assert session.push(message, size=1000, assignments=True)
    assert policy.plan([session]) == []
    assert session.throttled


def test_messages_are_split_by_bytes_a_large_item_alone() -> None:
    mib = 1 << 20
    weights = [mib] * 7 + [MESSAGE_BYTES * 2] + [10] * 3
    groups = dispatch_policy.split(weights)
    assert [end - start for start, end, _ in groups] == [3, 3, 1, 1, 3]
    assert all(size <= MESSAGE_BYTES for _, end, size in groups if end - _ > 1)
    assert sum(end - start for start, end, _ in groups) == len(weights)
    assert dispatch_policy.split([]) == []


async def test_claimed_rows_pack_into_messages_under_the_limit() -> None:
    rows = [
        {
            "id": f"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a{n:02x}",
            "attempt": 1,
            "epoch": 1,
            "queue": "q",
            "type": "a",
            "payload": b"x" * (1 << 20),
            "content_type": "application/json",
            "max_attempts": 3,
            "idempotency_key": None,
            "timeout_ms": 1000,
            "labels": "{}",
            "traceparent": "",
            "create_time": None,
        }
        for n in range(80)
    ]
    packed = DispatchPolicy.pack(rows)
    assert sum(p.count for p in packed) == 80
    assert all(p.message.ByteSize() <= MESSAGE_BYTES + (1 << 20) for p in packed)
    assert all(p.size >= p.message.ByteSize() for p in packed)
    leases = [a.lease.task_id for p in packed for a in p.message.assignments.assignments]
    assert leases == [r["id"] for r in rows]


async def test_a_fresh_task_is_handed_only_to_a_starving_session_that_takes_it() -> None:
    busy = _session("busy")
    other = _session("other", starving=True, task_types=("b",))
    idle = _session("idle", starving=True, credit=1)
    assert DispatchPolicy.pick_idle([busy, other], "t", "q", "a") is None
    assert DispatchPolicy.pick_idle([busy, other, idle], "t", "q", "a") is idle
    assert idle.credit == 0
    assert DispatchPolicy.pick_idle([idle], "t", "q", "a") is None


async def test_an_encrypted_task_goes_only_to_a_session_that_holds_its_key() -> None:
    """Named keys limit a session to what it can open; unnamed (an older worker) is any."""
    keyless = _session("keyless", starving=True, encryption_keys=frozenset())
    keyed = _session("keyed", starving=True, encryption_keys=frozenset({"k1"}))
    unsaid = _session("unsaid", starving=True)
    assert keyless.opens(None) and not keyless.opens("k1")
    assert keyed.opens("k1") and not keyed.opens("k2") and unsaid.opens("k2")
    assert DispatchPolicy.pick_idle([keyless], "t", "q", "a", "k1") is None
    assert DispatchPolicy.pick_idle([keyless, keyed], "t", "q", "a", "k1") is keyed
    assert DispatchPolicy.pick_idle([keyless], "t", "q", "a") is keyless  # not encrypted
    # Unserved, and why: nobody takes it at all, or those who take it lack its key.
    other_type = _session("other", task_types=("b",), encryption_keys=frozenset({"k2"}))
    assert dispatch_policy.unserved([other_type], "t", "q", "a", "k2") == (True, "")
    assert dispatch_policy.unserved([keyless, keyed], "t", "q", "a", "k2") == (True, "k2")
    assert dispatch_policy.unserved([keyless, keyed], "t", "q", "a", "k1") == (False, "")
    assert dispatch_policy.unserved([keyless, unsaid], "t", "q", "a", "k2") == (False, "")
    assert dispatch_policy.unserved([keyless], "t", "q", "a", None) == (False, "")


async def test_workers_of_several_tenants_take_turns_in_portions() -> None:
    policy = DispatchPolicy(lease_seconds=30, max_payload_bytes=1 << 20)
    busy = [_session(f"a{i}", credit=1000, tenant="a") for i in range(3)]
    quiet = _session("b0", credit=1000, tenant="b")
    alone = policy.plan(busy)
    assert {c.limit for c in alone} == {MAX_CLAIM_PER_SESSION}  # one tenant: no portions
    for _ in range(4):  # whatever the rotation, b is never behind more than one of a's
        claims = policy.plan([*busy, quiet])
        order = [c.session.worker_id for c in claims]
        assert order.index("b0") <= 1, order
        assert [o[0] for o in order[:2]] in (["a", "b"], ["b", "a"])
        assert {c.limit for c in claims} == {dispatch_policy.FAIR_QUANTUM}
    assert dispatch_policy.by_tenant([quiet]) is None


async def test_a_tenant_dispatch_weight_scales_its_portions() -> None:
    weights = {"a": 3, "c": 99}
    policy = DispatchPolicy(
        lease_seconds=30, max_payload_bytes=1 << 20, weight=lambda t: weights.get(t, 1)
    )
    sessions = [
        _session("a0", credit=1000, tenant="a"),
        _session("b0", credit=1000, tenant="b"),
        _session("c0", credit=1000, tenant="c"),
        _session("d0", credit=150, tenant="d"),
    ]
    limits = {c.session.worker_id: c.limit for c in policy.plan(sessions)}
    quantum = dispatch_policy.FAIR_QUANTUM
    # a: 3 portions; b: one; c: bounded by the most a claim takes; d: its credit.
    assert limits == {"a0": 3 * quantum, "b0": quantum, "c0": MAX_CLAIM_PER_SESSION, "d0": 100}
    # Alone, a tenant's weight changes nothing: its claims are whole.
    assert [c.limit for c in policy.plan(sessions[:1])] == [MAX_CLAIM_PER_SESSION]


def test_the_next_keyed_claim_starts_after_the_last_key_served() -> None:
    """Keys are visited after the last stop, wrapping around (byte order): the next claim
    starts after the last one visited that was served."""
    assert last_key(["b", "d"], "") == "d"
    assert last_key(["b", "d"], "c") == "b"  # visited d, then wrapped to b
    assert last_key(["c"], "c") == "c"  # the stop itself comes last
    assert last_key([], "c") == "c"  # nothing served: stays
    assert last_key(["é", "z"], "a") == "é"  # code points, as COLLATE "C" on UTF-8


def test_keyed_claims_remember_where_each_pair_stopped() -> None:
    keys = ConcurrencyKeys()
    pairs = [("q", "a", 10), ("q", "b", 10)]
    assert keys.after("t", pairs) == ["", ""]
    rows = [
        {"queue": "q", "type": "a", "concurrency_key": "k1"},
        {"queue": "q", "type": "a", "concurrency_key": "k3"},
        {"queue": "q", "type": "b", "concurrency_key": "k2"},
    ]
    keys.served("t", rows)
    assert keys.after("t", pairs) == ["k3", "k2"]
    assert keys.after("other", pairs) == ["", ""]
    keys.reset()
    assert keys.after("t", pairs) == ["", ""]


def test_a_tenant_keeps_the_keyed_claim_for_a_while_after_its_keyed_tasks_were_seen() -> None:
    """A trickle of keyed tasks, each taken before the next read, must not drop its
    tenant between tasks (each new one would wait for the next read)."""
    now = [1000.0]
    keys = ConcurrencyKeys(clock=lambda: now[0])
    keys.seen(["t"])
    assert keys.tenants == {"t"}
    now[0] += KEYED_STICKY - 1
    keys.seen([])  # none ready at this read
    assert keys.tenants == {"t"}
    keys.seen(["u"])
    now[0] += 2
    keys.seen([])
    assert keys.tenants == {"u"}  # t's last sighting is past KEYED_STICKY
    keys.reset()
    assert keys.tenants == frozenset()
