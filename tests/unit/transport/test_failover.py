"""The shared failover rules: address lists, the address book, backoff with jitter."""

from __future__ import annotations

import random

import pytest

from conveyor.transport import AddressBook, Backoff, parse_addresses


def test_parse_addresses_accepts_the_usual_forms() -> None:
    assert parse_addresses("a:1") == ["a:1"]
    assert parse_addresses(" a:1, b:2 ,a:1,") == ["a:1", "b:2"]  # order kept, duplicates dropped
    assert parse_addresses(["[::1]:50051", "10.0.0.1:50051"]) == ["[::1]:50051", "10.0.0.1:50051"]
    # gRPC target URIs are left to gRPC.
    assert parse_addresses("dns:///coordinator:50051") == ["dns:///coordinator:50051"]
    assert parse_addresses("unix:/run/conveyor.sock") == ["unix:/run/conveyor.sock"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no coordinator address given"),
        (" , ", "no coordinator address given"),
        ([], "no coordinator address given"),
        ("localhost", "invalid coordinator address 'localhost': expected host:port"),
        ("host:port", "invalid coordinator address 'host:port'"),
        (":50051", "invalid coordinator address ':50051'"),
    ],
)
def test_parse_addresses_names_what_is_wrong(value: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_addresses(value)


def test_address_book_rotates_and_follows_redirects() -> None:
    book = AddressBook(["a:1", "b:2", "c:3"])
    assert book.current == "a:1"
    assert [book.next_after(a) for a in ("a:1", "b:2", "c:3")] == ["b:2", "c:3", "a:1"]
    # A known leader is followed, even outside the list; an unknown one means "next".
    assert book.redirect("z:9", from_address="a:1") == "z:9"
    assert book.redirect(None, from_address="b:2") == "c:3"
    assert book.redirect("", from_address="c:3") == "a:1"
    # A failed redirect target outside the list leads on after the address that sent us
    # there (issue 20, break 9: the compose file's leader advertises an address its own
    # workers cannot reach; going back to the first address looped on a follower).
    assert book.next_after("z:9") == "b:2"
    assert book.redirect("z:9", from_address="c:3") == "z:9"
    assert book.next_after("z:9") == "a:1"
    assert book.next_after("y:8") == "a:1"  # a target nobody listed sent us to
    book.answered("z:9")
    assert book.current == "z:9"
    with pytest.raises(ValueError, match="at least one"):
        AddressBook([])


def test_backoff_steps_double_to_the_cap_with_jitter_over_the_upper_half() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0)
    assert [backoff.step(n) for n in (1, 2, 3, 4, 5, 100, 10**9)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    )
    rng = random.Random(7)
    delays = [backoff.delay(3, rng=rng) for _ in range(200)]
    assert all(0.2 <= d <= 0.4 for d in delays)
    assert len(set(delays)) > 100  # jittered: clients that failed together spread out
    assert backoff.step(0) == backoff.step(1)  # attempts count from 1; 0 is treated as 1
    for bad in ({"initial": 0, "maximum": 1}, {"initial": 2, "maximum": 1}):
        with pytest.raises(ValueError, match="invalid backoff"):
            Backoff(**bad)
    with pytest.raises(ValueError, match="invalid backoff"):
        Backoff(initial=1, maximum=2, multiplier=0.5)
