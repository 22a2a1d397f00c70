"""``conveyor top``: a live view of queues, workers and leadership, refreshed every second.

Each refresh asks a coordinator for the cluster status (the leader's, which knows the
workers) and the queues (their depth and oldest pending task), and, with ``--metrics``,
scrapes a coordinator's metrics endpoint for throughput: rates are the counters'
increase between two scrapes. What is shown is drawn by
:mod:`conveyor.observability.top` (data in, rich out); this module only fetches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from conveyor.cli import values, wire
from conveyor.cli.app import Globals, command
from conveyor.cli.errors import CLIError
from conveyor.client import QueueStats, RPCError
from conveyor.observability.top import (
    QueueRates,
    QueueTotals,
    Snapshot,
    rates,
    render,
    snapshot_from_protos,
    totals_from_metrics,
)
from conveyor.v1 import admin_service_pb2

#: Longest a scrape of the metrics endpoint may take.
SCRAPE_TIMEOUT = 5.0


def register(app: typer.Typer) -> None:
    command(
        app,
        "top",
        example=[
            "conveyor top",
            "conveyor --coordinator 10.0.0.5:50051 top --metrics http://10.0.0.5:9464/metrics",
        ],
    )(top)


def top(
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            metavar="URL",
            help="A coordinator's metrics endpoint (its --metrics-listen), for the rates.",
        ),
    ] = "",
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            metavar="DURATION",
            parser=values.seconds(0.1),
            help="Between refreshes.",
        ),
    ] = 1.0,
    iterations: Annotated[
        int,
        typer.Option("--iterations", min=0, help="Refreshes before exiting (0: until Ctrl-C)."),
    ] = 0,
    *,
    g: Globals,
) -> int:
    """Watch queues (depth, oldest pending task, rates), workers and leadership live.

    Refreshed every --interval seconds until Ctrl-C. The rates (tasks in, done and failed
    per second) need a coordinator's metrics endpoint: pass it with --metrics. The exit
    code is 1 when the last refresh could not reach the cluster.
    """
    url = metrics
    if url and not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    if url and "/" not in url.split("://", 1)[1]:
        url += "/metrics"
    watcher = Watcher(g, url)
    try:
        return asyncio.run(watcher.run(interval, iterations, Console()))
    except KeyboardInterrupt:
        return 0


@dataclass
class _Scrape:
    at: float
    totals: dict[str, QueueTotals]


class Watcher:
    """Fetches snapshots; keeps the previous scrape to turn counters into rates."""

    def __init__(self, g: Globals, metrics_url: str) -> None:
        self._g = g
        self._metrics_url = metrics_url
        self._previous: _Scrape | None = None
        self._last: Snapshot | None = None
        self.reached = False
        """Whether the last refresh reached the cluster."""

    async def run(self, interval: float, iterations: int, console: Console) -> int:
        """Refreshes ``iterations`` times (forever with 0); 1 if the last one failed."""
        count = 0
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    snapshot = await self.snapshot()
                    live.update(render(snapshot), refresh=True)
                    count += 1
                    if iterations and count >= iterations:
                        return 0 if self.reached else 1
                    await asyncio.sleep(interval)
        finally:
            if not console.is_terminal:
                console.line()  # a terminal gets its newline from Live

    async def snapshot(self) -> Snapshot:
        problems: list[str] = []
        status = admin_service_pb2.GetClusterStatusResponse()
        queues: list[QueueStats] = []
        self.reached = False
        try:
            status = await wire.cluster_status(self._g)
            async with self._g.async_client() as client:
                queues = await client.queues()
            self.reached = True
        except (RPCError, CLIError) as exc:
            problems.append(f"cannot read the cluster: {exc}")
            if self._last is not None:
                # Keep the last picture up, marked stale (its time says when it was taken).
                return dataclasses.replace(self._last, problem="; ".join(problems))
        queue_rates = await self._rates(problems)
        now = datetime.now(UTC)
        oldest = {
            q.name: max(0.0, (now - q.oldest_pending_time).total_seconds())
            for q in queues
            if q.oldest_pending_time is not None
        }
        snapshot = snapshot_from_protos(
            status,
            queues,
            queue_rates=queue_rates,
            oldest_pending=oldest,
            taken_at=now,
            problem="; ".join(problems),
        )
        if self.reached:
            self._last = dataclasses.replace(snapshot, problem="")
        return snapshot

    async def _rates(self, problems: list[str]) -> dict[str, QueueRates] | None:
        if not self._metrics_url:
            return None
        try:
            text = await asyncio.to_thread(_fetch, self._metrics_url)
        except (OSError, ValueError) as exc:
            problems.append(f"metrics at {self._metrics_url}: {exc}")
            return None
        scrape = _Scrape(time.monotonic(), totals_from_metrics(text))
        previous, self._previous = self._previous, scrape
        if previous is None:
            return None
        return rates(previous.totals, scrape.totals, scrape.at - previous.at)


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            body: bytes = response.read()
    except urllib.error.URLError as exc:
        raise OSError(f"cannot scrape it ({exc.reason})") from None
    return body.decode()
