"""deploy/compose.yaml and deploy/kubernetes/: every command and flag exists in the CLI
(asked of the real ``conveyor`` command's help), the ports and names line up, and the
Kubernetes manifests validate against the Kubernetes schemas."""

from __future__ import annotations

import copy
import functools
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
# KEDA's resources: applied on their own (they need KEDA's CRDs), checked by their own test.
KEDA_FILE = "scaledobject.yaml"

# Used by the deploy files but not in the CLI yet. Keep this list short: each entry is
# work still to do, and the test below checks every entry is still used.
PENDING_FLAGS: dict[str, str] = {}
PENDING_COMMANDS: dict[str, str] = {}
# What the Kubernetes files expect the cluster to provide.
EXTERNAL_SECRETS = {"conveyor-db", "conveyor-keys"}
EXTERNAL_HOSTS = {"etcd"}
SWITCHES = {"--demo", "--json", "--wait", "--debug"}
# A worker pod may only be killed once its drain (the grace period) and the flush of its
# last results are over.
FLUSH_MARGIN_SECONDS = 10


def conveyor_help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.main", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@functools.cache
def global_flags() -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", conveyor_help()))


@functools.cache
def command_flags(command: str) -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", conveyor_help(command)))


@functools.cache
def commands() -> frozenset[str]:
    return frozenset(re.findall(r"\b[a-z][a-z-]+\b", conveyor_help()))


def parse_command(argv: list[str]) -> tuple[str, dict[str, str]]:
    """(subcommand, {flag: value}) of a ``conveyor`` command line (flags as --x=v or
    --x v; global flags may come before the subcommand)."""
    subcommand = ""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            # --flag VALUE, unless the flag is a switch (then VALUE is positional).
            takes_next = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            if not eq and takes_next and name not in SWITCHES:
                value = argv[i + 1]
                i += 1
            flags[name] = value
        elif not subcommand:
            subcommand = arg
        i += 1
    return subcommand, flags


def check_cli(argv: list[str], where: str, used: set[str]) -> tuple[str, dict[str, str]]:
    """Fails unless the command and every flag exist (or are listed as pending)."""
    subcommand, flags = parse_command(argv)
    if subcommand in PENDING_COMMANDS:
        used.add(subcommand)
    else:
        assert subcommand in commands(), f"{where}: `conveyor {subcommand}` does not exist"
    for flag in flags:
        if flag in PENDING_FLAGS:
            used.add(flag)
            continue
        known = global_flags() | (
            command_flags(subcommand) if subcommand not in PENDING_COMMANDS else frozenset()
        )
        assert flag in known, f"{where}: `conveyor {subcommand}` has no flag {flag}"
    return subcommand, flags


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def worker_grace_default() -> float:
    from conveyor.worker import Worker

    default = inspect.signature(Worker.__init__).parameters["grace_period"].default
    assert isinstance(default, int | float)
    return float(default)


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, f"expected a duration like 40s, got {value!r}"
    return float(match.group(1))


# -- compose --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def conveyor_services(kind: str) -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {
        name: svc
        for name, svc in services.items()
        if svc.get("image") == "conveyor:local" and parse_command(svc["command"])[0] == kind
    }


def test_compose_has_the_services_the_issue_lists() -> None:
    services = compose()["services"]
    assert len(conveyor_services("coordinator")) == 3
    assert len(conveyor_services("worker")) == 2
    assert sum(1 for s in services.values() if "etcd" in s.get("image", "")) == 3
    for image in ("postgres", "prom/prometheus", "grafana/grafana", "jaegertracing/all-in-one"):
        assert any(s.get("image", "").startswith(image) for s in services.values()), image


@pytest.mark.slow
def test_compose_commands_and_flags_exist_in_the_cli() -> None:
    used: set[str] = set()
    for kind in ("coordinator", "worker"):
        for name, svc in conveyor_services(kind).items():
            check_cli(svc["command"], f"compose service {name}", used)
    health = re.search(r"HEALTHCHECK .*?CMD (\[[^\]]*\])", (ROOT / "Dockerfile").read_text(), re.S)
    assert health, "the Dockerfile has a HEALTHCHECK"
    argv = yaml.safe_load(health.group(1))
    assert argv[0] == "conveyor"
    check_cli(argv[1:], "Dockerfile HEALTHCHECK", used)
    for kind in ("coordinator", "worker"):
        for name, svc in kubernetes_containers(kind):
            check_cli(svc["args"], f"kubernetes {name}", used)
    stale = (set(PENDING_FLAGS) | set(PENDING_COMMANDS)) - used
    assert not stale, f"listed as pending but not used any more: {stale}"


def test_compose_ports_and_addresses_line_up() -> None:
    services = compose()["services"]
    coordinators = conveyor_services("coordinator")
    listen_ports = set()
    host_addresses: list[str] = []
    for name, svc in coordinators.items():
        _, flags = parse_command(svc["command"])
        _, port = host_port(flags["--listen"])
        listen_ports.add(port)
        (published,) = svc["ports"]
        host_ip, host_port_, container_port = published.split(":")
        assert container_port == str(port), f"{name} publishes {published}, listens on {port}"
        # Issue 20, break 9: a follower redirects to the leader's advertised address, so
        # it must be one the host reaches (the published port), never coordinatorN.
        assert flags["--advertise"] == f"{host_ip}:{host_port_}", name
        host_addresses.append(flags["--advertise"])
        dsn = urlsplit(flags["--dsn"])
        postgres = services[dsn.hostname or ""]["environment"]
        assert dsn.port == 5432
        assert (dsn.username, dsn.password, dsn.path) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            "/" + postgres["POSTGRES_DB"],
        )
        etcd_clients = {
            parse_command(s["command"])[1]["--advertise-client-urls"]
            for s in services.values()
            if "etcd" in s.get("image", "")
        }
        assert set(flags["--etcd"].split(",")) == etcd_clients
        otlp = urlsplit(svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert otlp.hostname in services and otlp.port == 4317  # Jaeger's OTLP/gRPC port
    assert len(listen_ports) == 1
    (port,) = listen_ports
    # The host's commands (compose's header, the operations page) name every coordinator:
    # with one address only, stopping it (the failover demo) leaves the host nothing.
    every = "--coordinator " + ",".join(host_addresses)
    page = (ROOT / "docs" / "operations.md").read_text()
    for text, where in ((COMPOSE.read_text(), "compose.yaml"), (page, "docs/operations.md")):
        named = re.findall(r"--coordinator (127\.0\.0\.1:5005\d\S*)", text)
        assert named and all(f"--coordinator {n}" == every for n in named), (where, named)
    for name, svc in conveyor_services("worker").items():
        _, flags = parse_command(svc["command"])
        assert flags["--coordinator"].split(",") == [f"{c}:{port}" for c in coordinators], name
        assert seconds(svc["stop_grace_period"]) == worker_grace_default() + FLUSH_MARGIN_SECONDS
        assert svc["healthcheck"] == {"disable": True}, "a worker serves no gRPC health"

    # Prometheus scrapes every coordinator and worker on its --metrics-listen port.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "compose-prometheus.yml").read_text())
    jobs = {
        job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]}
        for job in scrape["scrape_configs"]
    }
    for job, kind in (("conveyor-coordinator", "coordinator"), ("conveyor-worker", "worker")):
        expected = {
            f"{name}:{host_port(parse_command(svc['command'])[1]['--metrics-listen'])[1]}"
            for name, svc in conveyor_services(kind).items()
        }
        assert jobs[job] == expected, job
    assert scrape["rule_files"] == ["alerts.yml"]


def test_compose_mounts_exist_and_grafana_gets_the_dashboard() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", ()):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v[0] == ".")
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    grafana = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v[0] == ".")
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "conveyor.yml").read_text()
    )
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana["./grafana/conveyor.json"] == f"{dashboards_path}/conveyor.json"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


# -- kubernetes -----------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Each resource by file name (kustomization.yaml apart)."""
    out = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name not in ("kustomization.yaml", KEDA_FILE):
            out[path.name] = yaml.safe_load(path.read_text())
    return out


def deployment(component: str) -> dict[str, Any]:
    (found,) = [
        m
        for m in manifests().values()
        if m["kind"] == "Deployment"
        and m["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def kubernetes_containers(component: str) -> list[tuple[str, dict[str, Any]]]:
    pod = deployment(component)["spec"]["template"]["spec"]
    return [(f"{component}/{c['name']}", c) for c in pod["containers"]]


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(manifests()[name], version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(deployment("coordinator"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests())


def test_kubernetes_cross_references() -> None:
    resources = list(manifests().values())
    deployments = {d["metadata"]["name"]: d for d in resources if d["kind"] == "Deployment"}
    services = [r for r in resources if r["kind"] == "Service"]
    pdbs = [r for r in resources if r["kind"] == "PodDisruptionBudget"]
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs} == {
        "coordinator",
        "worker",
    }
    for d in deployments.values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(
            selector <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        ), pdb["metadata"]["name"]

    coordinator = deployment("coordinator")
    pod = coordinator["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    _, flags = parse_command(container["args"])
    assert host_port(flags["--listen"])[1] == ports["grpc"]
    assert host_port(flags["--metrics-listen"])[1] == ports["metrics"]
    assert flags["--advertise"] == f"$(POD_IP):{ports['grpc']}"
    assert {e["name"] for e in container["env"]} >= {"POD_IP", "CONVEYOR_DSN"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert urlsplit(flags["--etcd"]).hostname in EXTERNAL_HOSTS
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, c in kubernetes_containers("coordinator") + kubernetes_containers("worker")
        for e in c.get("env", ())
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets <= EXTERNAL_SECRETS

    (service,) = [s for s in services if s["metadata"]["name"] == "conveyor-coordinator"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for p in service_ports.values():
        assert p["targetPort"] in ports, p

    # Prometheus scrape annotations name the metrics port, on both kinds of pod.
    for component in ("coordinator", "worker"):
        template = deployment(component)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        (c,) = template["spec"]["containers"]
        metrics_port = host_port(parse_command(c["args"])[1]["--metrics-listen"])[1]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert {p["containerPort"] for p in c["ports"] if p["name"] == "metrics"} == {metrics_port}
        user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
        assert user and template["spec"]["securityContext"]["runAsUser"] == int(user.group(1))

    worker = deployment("worker")["spec"]["template"]["spec"]
    (wc,) = worker["containers"]
    _, wflags = parse_command(wc["args"])
    assert wflags["--coordinator"] == (
        f"{service['metadata']['name']}:{service_ports['grpc']['port']}"
    )
    grace = float(wflags.get("--grace-period", worker_grace_default()))
    assert worker["terminationGracePeriodSeconds"] == grace + FLUSH_MARGIN_SECONDS


def test_keda_scaledobject_scales_the_worker_deployment_through_the_coordinators() -> None:
    """The ScaledObject example names the worker Deployment, the coordinator Service's gRPC
    port, an env var of the worker that holds its key, its TriggerAuthentication, and
    metadata the scaler accepts."""
    from conveyor.coordinator.api.keda_scaler import API_KEY_ENTRY, parse_trigger

    documents = list(yaml.safe_load_all((KUBERNETES / KEDA_FILE).read_text()))
    by_kind = {d["kind"]: d for d in documents}
    assert sorted(by_kind) == ["ScaledObject", "TriggerAuthentication"]
    assert all(d["apiVersion"] == "keda.sh/v1alpha1" for d in documents)
    scaled, trigger_auth = by_kind["ScaledObject"], by_kind["TriggerAuthentication"]

    worker = deployment("worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    ((_, container),) = kubernetes_containers("worker")
    worker_env = {e["name"] for e in container["env"]}
    (service,) = [
        m
        for m in manifests().values()
        if m["kind"] == "Service" and m["metadata"]["name"] == "conveyor-coordinator"
    ]
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    triggers = scaled["spec"]["triggers"]
    assert triggers
    for trigger in triggers:
        assert trigger["type"] in ("external", "external-push")
        meta = trigger["metadata"]
        assert meta["scalerAddress"] == f"{service['metadata']['name']}:{grpc_port}"
        assert meta[API_KEY_ENTRY] in worker_env
        assert trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"]
        parsed = parse_trigger(meta, "default")  # refuses what the scaler would refuse
        assert trigger["metricType"] == (
            "Value" if parsed.metric == "oldestPendingAge" else "AverageValue"
        )
    # KEDA takes TLS material only from a TriggerAuthentication for this scaler.
    for ref in trigger_auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in ("caCert", "tlsClientCert", "tlsClientKey")
    assert (
        KEDA_FILE
        not in yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    )
