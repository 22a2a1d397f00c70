"""The metrics page built with its lines kept between scrapes: the same bytes as
prometheus_client's, and never a stale value."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import urllib.request
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

from conveyor.observability import _collectors
from conveyor.observability._exposition import Exposition
from conveyor.observability.metrics import (
    BatchHistogram,
    CoordinatorMetrics,
    MetricsServer,
    WorkerPool,
)


def populated() -> tuple[CollectorRegistry, Gauge, Counter]:
    """A registry of every kind of family, with label values that need escaping."""
    r = CollectorRegistry()
    c = Counter("jobs", "Jobs done.\nTwo lines, a \\ backslash.", ("queue", "type"), registry=r)
    c.labels("q", "t").inc(3)
    c.labels('q"uoted', "new\nline \\").inc()
    g = Gauge("depth", "Depth.", ("queue",), registry=r)
    g.labels("a").set(1.5)
    g.labels("b").set(float("inf"))
    Gauge("plain", "No labels.", registry=r).set(-2)
    h = Histogram("took_seconds", "Took.", ("kind",), buckets=(0.1, 1.0), registry=r)
    h.labels("x").observe(0.5)
    Summary("size_bytes", "Size.", registry=r).observe(10)
    Info("build", "Build.", registry=r).info({"version": "1.0"})
    Enum("state", "State.", states=["up", "down"], registry=r).state("down")
    b = BatchHistogram("wait_seconds", "Wait.", ("queue",), buckets=(0.5, 5.0), registry=r)
    b.observe_many(("q",), [0.1, 1.0, 10.0])
    return r, g, c


def test_the_page_is_prometheus_clients_byte_for_byte() -> None:
    registry, _, _ = populated()
    exposition = Exposition(registry)
    assert exposition.generate() == generate_latest(registry)
    # A second scrape, from the lines kept, is the same page again.
    assert exposition.generate() == generate_latest(registry)


def test_a_coordinators_page_is_prometheus_clients_byte_for_byte() -> None:
    m = CoordinatorMetrics(process_metrics=False)
    m.record_flush("submit", 10, 0.002)
    m.record_loop_lag(0.01)
    m.count_submitted([("default", "q", "t")] * 3)
    exposition = Exposition(m.registry)
    assert exposition.generate() == generate_latest(m.registry)


def test_a_batch_histogram_renders_its_own_text_and_again_only_what_changed() -> None:
    r = CollectorRegistry()
    b = BatchHistogram("wait_seconds", "Wait.", ("queue", "type"), buckets=(0.5, 5.0), registry=r)
    exposition = Exposition(r)
    assert exposition.generate() == generate_latest(r)  # no series yet: the head alone
    odd = ('q"uoted', "new\nline \\")
    b.observe(odd, 0.1)
    b.observe_pairs([(("a", "t"), 10.0), (("a", "t"), 1.0)])
    assert exposition.generate() == generate_latest(r)
    kept = dict(b._texts)
    b.observe(("a", "t"), 0.2)
    page = exposition.generate()
    assert page == generate_latest(r)
    assert 'wait_seconds_count{queue="a",type="t"} 3.0' in page.decode()
    # The series nobody observed kept its text; the other was rendered again.
    assert b._texts[odd][2] is kept[odd][2]
    assert b._texts[("a", "t")][2] is not kept[("a", "t")][2]
    # Nothing observed since the last scrape: the whole family's text as it was.
    assert b.exposition_text() is b.exposition_text()
    b.observe_groups({("b", "t"): [0.7]})
    assert exposition.generate() == generate_latest(r)


def test_every_scrape_shows_the_values_of_its_moment() -> None:
    registry, gauge, counter = populated()
    exposition = Exposition(registry)
    first = exposition.generate().decode()
    assert 'depth{queue="a"} 1.5' in first
    gauge.labels("a").set(7)
    counter.labels("q", "t").inc()
    second = exposition.generate().decode()
    assert 'depth{queue="a"} 7.0' in second and 'depth{queue="a"} 1.5' not in second
    assert 'jobs_total{queue="q",type="t"} 4.0' in second
    assert exposition.generate() == generate_latest(registry)


def test_series_come_and_go_and_the_kept_lines_follow_them() -> None:
    registry, gauge, _ = populated()
    exposition = Exposition(registry)
    exposition.generate()
    gauge.remove("b")
    gauge.labels("c").set(3)
    page = exposition.generate().decode()
    assert 'depth{queue="b"}' not in page
    assert 'depth{queue="c"} 3.0' in page
    kept = {labels for _, labels in exposition._lines}
    assert (("queue", "b"),) not in kept and (("queue", "c"),) in kept
    assert page.encode() == generate_latest(registry)


async def test_loop_sources_are_read_in_one_trip_per_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    trips: list[int] = []
    real = _collectors.call_on_loop

    def counting(source: Any, loop: Any, timeout: float) -> Any:
        trips.append(1)
        return real(source, loop, timeout)

    credits = [15]

    def pools() -> Iterable[WorkerPool]:
        return [WorkerPool("default", connected=1, credits=credits[0], in_flight=0)]

    m = CoordinatorMetrics(process_metrics=False)
    m.watch_workers(pools, loop=loop)
    m.watch_queue_pauses(lambda: [("default", "paused")], loop=loop)
    m.watch_rate_limits(lambda: [("tenant", "default", "", "t", 2.0)], loop=loop)
    m.watch_circuit_breakers(lambda: [("default", "t", 2)], loop=loop)
    exposition = Exposition(m.registry)
    monkeypatch.setattr(_collectors, "call_on_loop", counting)
    page = (await asyncio.to_thread(exposition.generate)).decode()
    assert len(trips) == 1, "four sources, one trip to the loop"
    credits[0] = 9
    again = (await asyncio.to_thread(exposition.generate)).decode()
    assert 'conveyor_workers_credits{tenant="default"} 15.0' in page
    assert 'conveyor_queue_paused{queue="paused",tenant="default"} 1.0' in page
    assert 'conveyor_circuit_breaker_state{tenant="default",type="t"} 2.0' in page
    assert 'conveyor_workers_credits{tenant="default"} 9.0' in again, "read afresh"
    assert len(trips) == 2


async def test_a_prefetched_value_is_used_once_and_never_old() -> None:
    loop = asyncio.get_running_loop()
    reads: list[int] = []

    def pools() -> Iterable[WorkerPool]:
        reads.append(1)
        return [WorkerPool("default", connected=len(reads), credits=0, in_flight=0)]

    m = CoordinatorMetrics(process_metrics=False)
    collector = m.watch_workers(pools, loop=loop)
    await asyncio.to_thread(_collectors.prefetch_sources, [collector])
    assert len(reads) == 1
    # Left over (a scrape that failed before collecting), then too old: read afresh.
    value, at = collector._prefetched
    collector._prefetched = (value, at - _collectors.PREFETCH_MAX_AGE)
    text = (await asyncio.to_thread(generate_latest, m.registry)).decode()
    assert 'conveyor_workers_connected{tenant="default"} 2.0' in text
    # Used: the next collect reads the source again.
    text = (await asyncio.to_thread(generate_latest, m.registry)).decode()
    assert 'conveyor_workers_connected{tenant="default"} 3.0' in text


def test_scrapes_at_once_each_get_a_whole_page() -> None:
    registry, _, _ = populated()
    exposition = Exposition(registry)
    pages: list[bytes] = []

    def scrape() -> None:
        for _ in range(20):
            pages.append(exposition.generate())

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(pages) == {generate_latest(registry)}


def get(url: str, **headers: str) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(response.headers), response.read()


def test_the_server_serves_the_page_plain_gzipped_or_as_openmetrics() -> None:
    registry, _, _ = populated()
    server = MetricsServer(registry, "127.0.0.1:0")
    server.start()
    try:
        headers, body = get(server.url)
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert body == generate_latest(registry)
        headers, body = get(server.url, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(body) == generate_latest(registry)
        # OpenMetrics and name[] filters: prometheus_client's own app.
        headers, body = get(server.url, Accept=OPENMETRICS)
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        _, body = get(server.url + "?name[]=plain")
        assert body == b"# HELP plain No labels.\n# TYPE plain gauge\nplain -2.0\n"
    finally:
        server.stop()


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_server_answers_what_is_not_a_scrape_and_keeps_serving() -> None:
    registry, _, _ = populated()
    server = MetricsServer(registry, "127.0.0.1:0")
    server.start()
    try:
        assert _raw(server.port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.0 400 ")
        refused = _raw(server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.0 405 ") and b"Allow: OPTIONS,GET" in refused
        # A client that hangs up mid-request costs its own thread only.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")
        page = _raw(server.port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = page.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert f"Content-Length: {len(body)}".encode() in head
        assert body == generate_latest(registry)
    finally:
        server.stop()
