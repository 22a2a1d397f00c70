"""Collectors read at scrape time (queue depth, workers, worker process) and the HTTP server."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conveyor.observability.metrics import (
    CoordinatorMetrics,
    MetricsServer,
    QueueDepth,
    WorkerMetrics,
    WorkerPool,
    WorkerProcessState,
    call_on_loop,
    parse_listen,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def depth_of(metrics: CoordinatorMetrics, queue: str, state: str) -> float | None:
    return metrics.registry.get_sample_value(
        "conveyor_queue_depth", {"tenant": "default", "queue": queue, "state": state}
    )


def test_queue_depth_is_fetched_once_per_max_age() -> None:
    calls: list[int] = []

    def fetch() -> list[QueueDepth]:
        calls.append(1)
        return [QueueDepth("default", "q", pending=len(calls), dead=2)]

    m = CoordinatorMetrics(process_metrics=False)
    collector = m.watch_queue_depth(fetch, max_age=5.0)
    clock = FakeClock()
    collector._clock = clock  # the monotonic clock, made steppable for the test
    assert depth_of(m, "q", "pending") == 1
    assert depth_of(m, "q", "dead") == 2
    assert depth_of(m, "q", "running") == 0
    clock.now += 4.9
    assert depth_of(m, "q", "pending") == 1  # cached
    clock.now += 0.2
    assert depth_of(m, "q", "pending") == 2  # refreshed
    assert len(calls) == 2


def test_a_slow_depth_query_is_reused_for_twenty_times_as_long_and_says_its_age() -> None:
    # Counting every unfinished task is linear in the depth (1.25 s at 10,000,000
    # waiting): reusing the result for 20 times what it took keeps the query a small
    # share of the database's time, and the age gauge says how old the figures are.
    clock = FakeClock()
    took = [2.0]
    calls: list[int] = []

    def fetch() -> list[QueueDepth]:
        calls.append(1)
        clock.now += took[0]
        return [QueueDepth("default", "q", pending=len(calls))]

    m = CoordinatorMetrics(process_metrics=False)
    collector = m.watch_queue_depth(fetch, max_age=5.0)
    collector._clock = clock  # the monotonic clock, made steppable for the test

    def age() -> float | None:
        return m.registry.get_sample_value("conveyor_queue_depth_age_seconds")

    assert depth_of(m, "q", "pending") == 1
    clock.now += 30.0
    assert depth_of(m, "q", "pending") == 1  # 30 s of a 40 s reuse
    assert age() == 30.0
    clock.now += 9.9
    assert depth_of(m, "q", "pending") == 1
    clock.now += 0.2
    took[0] = 0.01  # the table drained: back to max_age
    assert depth_of(m, "q", "pending") == 2
    assert age() == 0.0
    clock.now += 5.1
    assert depth_of(m, "q", "pending") == 3
    assert len(calls) == 3


def test_registering_the_depth_collector_does_not_query() -> None:
    def fetch() -> list[QueueDepth]:
        raise AssertionError("queried at registration")

    CoordinatorMetrics(process_metrics=False).watch_queue_depth(fetch)


def test_a_failing_depth_query_leaves_the_series_absent_and_counts_an_error() -> None:
    ok = True

    def fetch() -> list[QueueDepth]:
        if not ok:
            raise ConnectionError("database down")
        return [QueueDepth("default", "q", pending=3, oldest_pending_age_seconds=12.5)]

    m = CoordinatorMetrics(process_metrics=False)
    collector = m.watch_queue_depth(fetch, max_age=0)
    # A clock that stands still: the fetch takes no time, so nothing is reused.
    collector._clock = FakeClock()
    assert depth_of(m, "q", "pending") == 3
    age = m.registry.get_sample_value(
        "conveyor_queue_oldest_pending_age_seconds", {"tenant": "default", "queue": "q"}
    )
    assert age == 12.5
    ok = False
    assert depth_of(m, "q", "pending") is None
    assert m.registry.get_sample_value("conveyor_queue_depth_errors_total") == 2  # two scrapes


async def test_an_async_depth_fetch_runs_on_its_loop_from_the_scrape_thread() -> None:
    loop = asyncio.get_running_loop()
    seen: list[asyncio.AbstractEventLoop] = []

    async def fetch() -> list[QueueDepth]:
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [QueueDepth("default", "q", running=4)]

    m = CoordinatorMetrics(process_metrics=False)
    m.watch_queue_depth(fetch, loop=loop)
    text = (await asyncio.to_thread(generate_latest, m.registry)).decode()
    assert 'conveyor_queue_depth{queue="q",state="running",tenant="default"} 4.0' in text
    assert seen == [loop]


async def test_a_fetch_slower_than_its_timeout_is_given_up() -> None:
    release = asyncio.Event()

    async def fetch() -> list[QueueDepth]:
        await release.wait()
        return []

    m = CoordinatorMetrics(process_metrics=False)
    m.watch_queue_depth(fetch, loop=asyncio.get_running_loop(), timeout=0.2)
    text = (await asyncio.to_thread(generate_latest, m.registry)).decode()
    assert "conveyor_queue_depth_errors_total 1.0" in text
    release.set()


async def test_collecting_on_the_sources_own_loop_is_refused_not_deadlocked() -> None:
    async def fetch() -> list[QueueDepth]:
        return []

    source: Callable[[], list[QueueDepth] | Awaitable[list[QueueDepth]]] = fetch
    with pytest.raises(RuntimeError, match="another thread"):
        call_on_loop(source, asyncio.get_running_loop(), timeout=5)


def test_an_async_source_without_a_loop_is_a_clear_error() -> None:
    async def fetch() -> list[QueueDepth]:
        return []

    source: Callable[[], list[QueueDepth] | Awaitable[list[QueueDepth]]] = fetch
    with pytest.raises(TypeError, match="needs the event loop"):
        call_on_loop(source, None, timeout=1)


async def test_worker_gauges_are_read_from_their_sources() -> None:
    loop = asyncio.get_running_loop()

    def pools() -> Iterable[WorkerPool]:
        return [WorkerPool("default", connected=2, credits=15, in_flight=5)]

    m = CoordinatorMetrics(process_metrics=False)
    m.watch_workers(pools, loop=loop)
    w = WorkerMetrics(process_metrics=False)
    w.watch_process(lambda: WorkerProcessState(concurrency=8, running=3, connected=True))
    coordinator_text = (await asyncio.to_thread(generate_latest, m.registry)).decode()
    worker_text = generate_latest(w.registry).decode()
    assert 'conveyor_workers_connected{tenant="default"} 2.0' in coordinator_text
    assert 'conveyor_workers_credits{tenant="default"} 15.0' in coordinator_text
    assert 'conveyor_workers_in_flight_tasks{tenant="default"} 5.0' in coordinator_text
    assert "conveyor_worker_concurrency 8.0" in worker_text
    assert "conveyor_worker_running_tasks 3.0" in worker_text
    assert "conveyor_worker_connected 1.0" in worker_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("metrics.local:80", ("metrics.local", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9464", "not HOST:PORT"),
        ("host:port", "not HOST:PORT"),
        ("host:70000", "out of range"),
        ("::1:9464", r"write an IPv6 host as \[::1\]"),
        ("[nope]:1", "not an IPv6 address"),
        ("[::1", "not HOST:PORT"),
        ("::1]:80", "not HOST:PORT"),
    ],
)
def test_parse_listen_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def fetch_url(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_metrics_server_serves_its_registry_and_stops() -> None:
    m = WorkerMetrics()
    m.reconnects.inc(3)
    server = MetricsServer(m.registry, "127.0.0.1:0")
    server.start()
    try:
        assert server.port > 0
        status, content_type, body = fetch_url(server.url)
        assert status == 200
        assert content_type.startswith("text/plain")
        assert "conveyor_worker_reconnects_total 3.0" in body
        assert "process_cpu_seconds_total" in body
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        fetch_url(server.url)


def test_metrics_server_on_a_busy_port_names_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = MetricsServer(CollectorRegistry(), f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            server.start()
