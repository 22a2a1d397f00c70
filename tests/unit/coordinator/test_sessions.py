"""A session's outbox (coordinator/sessions.py): pushing never waits; a worker that stops
reading is evicted; what was never written is known, so its leases can go back uncounted."""

from __future__ import annotations

import asyncio

from conveyor.coordinator.dispatch.sessions import OUTBOX_MESSAGES, Signal, WorkerSession
from conveyor.coordinator.lifecycle.leases import LeaseKey
from conveyor.v1 import worker_service_pb2 as pb

TASK = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def _session() -> WorkerSession:
    return WorkerSession(
        session_id="s", worker_id="w", tenant="t", queues=("q",), task_types=("a",), credit=5
    )


def _assignments() -> pb.ConnectResponse:
    message = pb.ConnectResponse()
    message.assignments.assignments.add(lease=pb.Lease(task_id=TASK, attempt=2, epoch=3))
    return message


async def test_a_worker_that_stops_reading_is_evicted_without_waiting() -> None:
    session = _session()
    for _ in range(OUTBOX_MESSAGES):
        assert session.push(pb.ConnectResponse())
    assert not session.push(pb.ConnectResponse())  # returns at once
    assert session.evicted and session.closed and session.ended.done()
    assert "stopped reading" in session.end_reason
    assert not session.push(_assignments())


async def test_what_was_never_written_is_handed_back_as_lease_keys() -> None:
    session = _session()
    assert session.push(_assignments(), size=100, assignments=True)
    assert session.push(pb.ConnectResponse(heartbeat_ack=pb.HeartbeatAck()))
    assert session.push(_assignments(), size=100, assignments=True)
    taken = await asyncio.wait_for(session.next_message(), 1)
    assert taken is not None
    written, size = taken
    assert written.WhichOneof("message") == "assignments" and size == 100
    session.sent(size)
    session.end("the stream broke")
    assert session.take_undelivered() == [LeaseKey("t", TASK, 2, 3, "w")]
    assert session.outbox_empty


async def test_a_finishing_session_drains_then_says_so() -> None:
    session = _session()
    session.push(pb.ConnectResponse(redirect=pb.Redirect(leader_address="x")))
    session.finish("stepping down")
    assert not session.wants_work and not session.push(pb.ConnectResponse())
    first = await asyncio.wait_for(session.next_message(), 1)
    assert first is not None and first[0].WhichOneof("message") == "redirect"
    assert await asyncio.wait_for(session.next_message(), 1) is None


async def test_a_signal_wakes_every_waiter_and_a_cancelled_one_leaves_the_others() -> None:
    signal = Signal()
    loop = asyncio.get_running_loop()
    first, second, third = (loop.create_task(signal.wait()) for _ in range(3))
    await asyncio.sleep(0)  # one turn: each is waiting now
    assert not signal.is_set() and not any(t.done() for t in (first, second, third))
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert not first.done() and not third.done()  # not woken by the other's cancellation
    signal.set()
    await asyncio.wait_for(asyncio.gather(first, third), 1)
    assert signal.is_set()
    await asyncio.wait_for(signal.wait(), 1)  # set: returns at once
    signal.clear()
    assert not signal.is_set()
    waiting = loop.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    signal.set()
    await asyncio.wait_for(waiting, 1)


async def test_a_session_holds_no_attribute_dict_and_no_waiter_list_until_one_waits() -> None:
    # Per-session memory, 10,000 sessions with as many workers (issue 19): slotted, and
    # its signals make their list of waiters only when waited on (an Event makes a deque).
    session = _session()
    assert not hasattr(session, "__dict__")
    assert isinstance(session.done, Signal) and session.done._waiters is None
