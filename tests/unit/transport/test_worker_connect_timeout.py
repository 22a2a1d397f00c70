"""The worker's connection attempt: longer than a client's unless its options say (issue 19)."""

from __future__ import annotations

from conveyor.transport import ConnectionOptions
from conveyor.transport._options import WORKER_CONNECT_TIMEOUT
from conveyor.worker import Worker


def _least_attempt_ms(options: ConnectionOptions) -> int:
    # gRPC's minimum connect timeout, under its backoff's name.
    least: int = dict(options.channel_options())["grpc.min_reconnect_backoff_ms"]
    return least


def test_a_worker_waits_longer_for_a_connection_than_a_client() -> None:
    worker = Worker()
    assert worker._options.connect_timeout == WORKER_CONNECT_TIMEOUT
    assert _least_attempt_ms(worker._options) == int(WORKER_CONNECT_TIMEOUT * 1000)
    # A client gives up on an unanswering coordinator as soon as the first backoff.
    assert _least_attempt_ms(ConnectionOptions()) == 200


def test_a_workers_own_connect_timeout_is_kept() -> None:
    worker = Worker(options=ConnectionOptions(connect_timeout=0.5), api_key="k")
    assert worker._options.connect_timeout == 0.5
    assert worker._options.api_key == "k"
