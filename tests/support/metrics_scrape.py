"""Reading a process's Prometheus endpoint in tests, the way Prometheus reads it (HTTP,
the text exposition parsed by prometheus_client's parser).

    page = await scrape(coordinator.telemetry.metrics_url)
    assert page.value("conveyor_tasks_succeeded_total", queue="q") == 3
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclasses.dataclass(frozen=True)
class Page:
    """One scrape: every sample, and the families it announced (with or without samples)."""

    samples: list[Sample]
    families: set[str]

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.matching(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.matching(name, **labels))


def parse(text: str) -> Page:
    samples: list[Sample] = []
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        samples.extend(Sample(s.name, dict(s.labels), s.value) for s in family.samples)
    return Page(samples, families)


def scrape_sync(url: str) -> Page:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


async def scrape(url: str) -> Page:
    """Scrapes from a thread: the collectors run their sources on the caller's loop."""
    return await asyncio.to_thread(scrape_sync, url)
