"""Sessions, one-time links and the sign-in throttle, on a clock the tests drive."""

from __future__ import annotations

import pytest

from conveyor.console.sessions import SessionPolicy, SessionStore, SignInLinks, Throttle, same_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_when_idle_too_long() -> None:
    clock = Clock()
    store: SessionStore[str] = SessionStore(SessionPolicy(idle=60, lifetime=3600), clock=clock)
    session, pushed_out = store.add("client-1", "key1")
    assert pushed_out == []
    assert len(session.id) >= 43 and session.csrf != session.id
    clock.now += 59
    assert store.get(session.id) is session  # a use resets the idle time
    clock.now += 59
    assert store.get(session.id) is session
    clock.now += 61
    assert store.get(session.id) is None
    assert len(store) == 0
    assert store.expired() == ["client-1"]  # its client, to close, once
    assert store.expired() == []


def test_a_session_ends_after_its_lifetime_however_busy() -> None:
    clock = Clock()
    store: SessionStore[str] = SessionStore(SessionPolicy(idle=60, lifetime=100), clock=clock)
    session, _ = store.add("client", "key")
    for _ in range(10):
        clock.now += 10
        assert store.get(session.id) is session
    clock.now += 1
    assert not store.alive(session)
    assert store.get(session.id) is None


def test_the_sweep_ends_sessions_nobody_uses() -> None:
    clock = Clock()
    store: SessionStore[str] = SessionStore(SessionPolicy(idle=60), clock=clock)
    store.add("a", "")
    clock.now += 30
    store.add("b", "")
    clock.now += 31
    assert store.expired() == ["a"]
    assert len(store) == 1


def test_the_least_recently_used_session_makes_room() -> None:
    clock = Clock()
    store: SessionStore[str] = SessionStore(SessionPolicy(capacity=2), clock=clock)
    first, _ = store.add("a", "")
    second, _ = store.add("b", "")
    assert store.get(first.id) is first  # used: now the second is the oldest
    _, pushed_out = store.add("c", "")
    assert pushed_out == ["b"]
    assert store.get(second.id) is None and store.get(first.id) is first


def test_ending_and_clearing_hand_the_clients_back() -> None:
    store: SessionStore[str] = SessionStore(SessionPolicy())
    session, _ = store.add("a", "")
    store.add("b", "")
    assert store.end(session.id) == "a"
    assert store.end(session.id) is None
    assert not store.alive(session)
    assert store.clear() == ["b"]


def test_flash_messages_are_shown_once_and_few() -> None:
    store: SessionStore[str] = SessionStore(SessionPolicy())
    session, _ = store.add("a", "")
    for n in range(8):
        session.flash(f"m{n}", error=n % 2 == 1)
    taken = session.take_flashes()
    assert [f.text for f in taken] == ["m3", "m4", "m5", "m6", "m7"]
    assert session.take_flashes() == []


def test_a_sign_in_link_works_once_and_not_after_its_time() -> None:
    clock = Clock()
    links = SignInLinks(ttl=60, clock=clock)
    token = links.issue("cvk_key")
    assert links.redeem(token) == (True, "cvk_key")
    assert links.redeem(token) == (False, None)
    late = links.issue(None)
    clock.now += 61
    assert links.redeem(late) == (False, None)
    assert links.redeem("made-up") == (False, None)


def test_the_throttle_lets_a_burst_through_then_one_per_interval() -> None:
    clock = Clock()
    throttle = Throttle(rate=0.5, burst=3, clock=clock)
    for _ in range(3):
        assert throttle.wait() == 0
        throttle.spend()
    assert throttle.wait() == pytest.approx(2.0)
    throttle.refund()  # a sign-in that worked gives its token back
    assert throttle.wait() == 0
    throttle.spend()
    clock.now += 2
    assert throttle.wait() == 0


def test_same_token() -> None:
    assert same_token("abc", "abc")
    assert not same_token("abd", "abc")
    assert not same_token(None, "abc")
    assert not same_token("", "abc")


def test_a_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        SessionPolicy(idle=0)
