"""submit_many()'s requests: a spec repeated is converted once and copied after that."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from conveyor.client import TaskSpec
from conveyor.client._async_client import _requests


def test_a_repeated_spec_gives_equal_separate_requests() -> None:
    spec = TaskSpec(type="t", queue="q", payload={"n": 1}, labels={"k": "v"})
    other = TaskSpec(type="u", payload=b"raw", raw=True)
    requests = _requests([spec, spec, other, spec]).tasks
    assert [r.type for r in requests] == ["t", "t", "u", "t"]
    assert requests[0] == requests[1] == requests[3] == spec.to_proto()
    assert requests[2] == other.to_proto()
    # Separate messages: a request id given to one is not given to the others.
    requests[0].request_id = "a"
    assert requests[1].request_id == "" and requests[3].request_id == ""


def test_a_generator_is_converted_item_by_item() -> None:
    # One dict yielded again and again, changed in between: each item as it was.
    def changing() -> Iterator[dict[str, Any]]:
        item: dict[str, Any] = {"type": "t"}
        for n in range(3):
            item["payload"] = {"n": n}
            yield item

    assert [r.payload for r in _requests(changing()).tasks] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
