"""Invariants of the deployment files that no schema can check: every PRICING_* variable they
set is a setting with a valid value, the grace periods outlast the server's drain, the probes
ask the health service for names the server serves, the pods run as the image's user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pricing_service.__main__ import LIVENESS_SERVICE
from pricing_service.config import Settings, load_settings
from pricing_service.server import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SETTINGS = {f"PRICING_{name.upper()}" for name in Settings.model_fields}


def k8s(kind: str) -> list[dict[str, Any]]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return [d for d in docs if d.get("kind") == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in k8s(kind) if d["metadata"]["name"] == name]
    return found


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def k8s_env() -> dict[str, str]:
    env = dict(one("ConfigMap", "crowd-pricing")["data"])
    env.update(one("Secret", "crowd-pricing")["stringData"])
    return env


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return data


def valid(env: dict[str, str]) -> Settings:
    unknown = sorted(set(env) - SETTINGS)
    assert not unknown, f"not settings: {unknown}"
    values = {k.removeprefix("PRICING_").lower(): v for k, v in env.items()}
    values = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v) for k, v in values.items()}
    return load_settings(**values)


def test_kubernetes_settings_are_valid_settings() -> None:
    s = valid(k8s_env())
    assert s.metrics_host() == "0.0.0.0" and s.worker_metrics_addr == "0.0.0.0"


@pytest.mark.parametrize("service", ["server", "worker", "snapshot-load"])
def test_compose_settings_are_valid_settings(service: str) -> None:
    env = compose()["services"][service]["environment"]
    valid({k: str(v) for k, v in env.items()})


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_grace_periods_outlast_the_drain() -> None:
    grace = valid(k8s_env()).grace_period_s
    server = pod_spec(one("Deployment", "crowd-pricing-server"))
    (container,) = server["containers"]
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    assert server["terminationGracePeriodSeconds"] > int(cmd[1]) + grace
    services = compose()["services"]
    compose_grace = float(services["server"]["environment"]["PRICING_GRACE_PERIOD_S"])
    for name in ("server", "worker"):
        assert seconds(services[name]["stop_grace_period"]) > compose_grace


def test_probes_ask_for_names_the_server_serves() -> None:
    (container,) = pod_spec(one("Deployment", "crowd-pricing-server"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(k8s_env()["PRICING_LISTEN"].rpartition(":")[2])
    assert ports["grpc"] == listen_port
    assert ports["metrics"] == int(k8s_env()["PRICING_METRICS_PORT"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == listen_port
        assert grpc_probe["service"] in (LIVENESS_SERVICE, "", *SERVICE_NAMES), probe
    # liveness must not follow Redis (an outage would restart every replica)
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"]["service"] in SERVICE_NAMES


def test_pods_run_as_the_images_numeric_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    for doc in k8s("Deployment") + k8s("CronJob"):
        ctx = pod_spec(doc)["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) == user, doc["metadata"]["name"]
        for c in pod_spec(doc)["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_pdb_and_service_select_the_server_pods() -> None:
    labels = one("Deployment", "crowd-pricing-server")["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget", "crowd-pricing-server")["spec"]["selector"]["matchLabels"]
    svc = one("Service", "crowd-pricing")["spec"]["selector"]
    assert pdb.items() <= labels.items() and svc.items() <= labels.items()


def test_dockerfile_takes_its_base_as_a_build_argument() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", dockerfile, re.MULTILINE)
    assert dockerfile.count("FROM ${BASE_IMAGE}") == 2
