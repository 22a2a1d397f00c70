"""The PromQL in deploy/ (alert rules, the Grafana dashboard), and the Prometheus tools,
for the tests that check them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conveyor.observability.metrics import (
    CoordinatorMetrics,
    QueueDepth,
    WorkerMetrics,
    WorkerPool,
    WorkerProcessState,
    sample_names,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "conveyor.json"

# Dashboard variables, replaced by what Grafana would put there.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$tenant": ".*", "$queue": ".*"}


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> dict[str, str]:
    """Each panel target's expression (variables substituted), keyed by panel and refId;
    the template variables' queries too."""
    board = json.loads(DASHBOARD.read_text())
    exprs: dict[str, str] = {}
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            exprs[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((.*), *\w+\)", query["query"])
            assert match, query
            exprs[f"variable {variable['name']}"] = match.group(1)
    for name, raw in exprs.items():
        expr = raw
        for variable, value in _GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        exprs[name] = expr
    return exprs


def alert_exprs() -> dict[str, str]:
    return {str(rule["alert"]): str(rule["expr"]) for rule in alert_rules()}


def metrics_in(expr: str) -> set[str]:
    """The conveyor_* series an expression reads (label values in quotes are skipped)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\bconveyor_[a-z0-9_]+\b", without_strings))


def exported_names() -> set[str]:
    """Every sample name Conveyor's processes export, the scrape-time collectors included."""
    coordinator = CoordinatorMetrics()
    coordinator.watch_queue_depth(lambda: [QueueDepth("default", "q", pending=1)])
    coordinator.watch_workers(lambda: [WorkerPool("default", 1, 1, 1)])
    coordinator.watch_queue_pauses(lambda: [("default", "q")])
    worker = WorkerMetrics()
    worker.watch_process(lambda: WorkerProcessState(1, 0, True))
    return sample_names(coordinator.registry) | sample_names(worker.registry)


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``; skips the test, saying how to get it,
    when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed: it comes with Debian's prometheus package "
            "(apt-get install prometheus), which .ci/run installs"
        )
    return path
