"""A real Prometheus server for tests (Debian's ``prometheus`` package), scraping the
given targets every second and loading the project's alert rules; queried through its
HTTP API.

    with PrometheusServer({"coordinator": [url]}, tmp_path) as prom:
        await eventually(lambda: prom.aquery('conveyor_leader == 1'))
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import yaml
from deploy_files import ALERTS, prometheus_tool
from processes import ManagedProcess, free_port


class PromQLError(Exception):
    """The server refused a query (a parse error names the position)."""


class PrometheusServer(ManagedProcess):
    """A Prometheus process (the tests' one process harness); its output in
    ``workdir/prometheus.log``."""

    def __init__(self, targets: Mapping[str, Sequence[str]], workdir: Path) -> None:
        """``targets``: job name -> metrics URLs (``http://host:port/metrics``)."""
        super().__init__("prometheus", workdir)
        self._binary = prometheus_tool("prometheus")
        self._dir = workdir
        self._targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _config(self) -> dict[str, Any]:
        shutil.copy(ALERTS, self._dir / "alerts.yml")
        jobs = []
        for job, urls in self._targets.items():
            parts = [urlsplit(u) for u in urls]
            paths = {p.path or "/metrics" for p in parts}
            assert len(paths) == 1, f"one metrics path per job, got {paths}"
            jobs.append(
                {
                    "job_name": job,
                    "metrics_path": paths.pop(),
                    "static_configs": [{"targets": [p.netloc for p in parts]}],
                }
            )
        return {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": jobs,
        }

    def start(self) -> Self:
        (self._dir / "prometheus.yml").write_text(yaml.safe_dump(self._config()))
        return super().start()

    def command(self) -> list[str]:
        return [
            str(self._binary),
            f"--config.file={self._dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def _get(self, path: str, **params: str) -> Any:
        if self.proc is not None and not self.running:
            raise AssertionError(f"prometheus exited: {self.log_tail()}")
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            with err:  # it holds the response open
                body = json.loads(err.read() or b"{}")
            raise PromQLError(body.get("error", str(err))) from None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar) the expression gives now."""
        body = self._get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def aquery(self, expr: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.query, expr)

    async def aget(self, path: str) -> Any:
        return await asyncio.to_thread(self._get, path)

    async def aready(self) -> bool:
        return await asyncio.to_thread(self.ready)
