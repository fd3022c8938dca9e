"""Every metric an alert (deploy/prometheus/alerts.yml) or the dashboard
(deploy/grafana/crowd-pricing.json) reads exists on the live ``/metrics`` of the real server
and the real ``sync-worker consume``; both endpoints bind the configured address."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.procs import Proc, pricing_service, service_env, sync_worker, wait_serving
from pricing_testing.redis_server import free_port
from tests.support.promql import metric_names
from tests.support.rpcs import upsert_fan_rule

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def used_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used (alert names, dashboard panel titles)."""
    used: dict[str, set[str]] = {}
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(f"alert {rule['alert']}")
    dashboard = json.loads((ROOT / "deploy/grafana/crowd-pricing.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return used


def scrape(port: int) -> set[str]:
    """The sample names on a /metrics page (a family with no sample does not count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def listening(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (/proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def wait_for(check: object, what: str, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s:\n{proc.log()}")


def test_every_alert_and_dashboard_metric_is_exported(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    used = used_metrics()
    assert len(used) > 20, used  # the extraction found the files' metrics
    server_port, worker_port = free_port(), free_port()
    env = service_env(
        redis_url=redis_url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_METRICS_PORT": str(server_port),
            "PRICING_METRICS_ADDR": "127.0.0.1",
            "PRICING_WORKER_METRICS_PORT": str(worker_port),
            "PRICING_WORKER_METRICS_ADDR": "0.0.0.0",
        },
    )
    server = pricing_service(env, tmp_path / "server.log")
    worker = sync_worker(env, tmp_path / "worker.log", "consume")
    try:
        target = env["PRICING_LISTEN"]
        wait_serving(target, server)
        with grpc.insecure_channel(target) as channel:
            upsert_fan_rule(channel, 1500)
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            wait_for(
                lambda: (
                    stub.BatchGetLowestPrice(
                        pricing_pb2.BatchGetLowestPriceRequest(
                            user_id="alice",
                            items=[
                                pricing_pb2.PriceQuery(
                                    item_id="1001",
                                    list_price=common_pb2.Money(
                                        currency_code="CNY", amount_minor=2500
                                    ),
                                )
                            ],
                        ),
                        timeout=5,
                    ).rule_revision
                    > 0
                ),
                "the rule reaches the index",
                server,
            )
        # a poison entry: the worker dead-letters it (sync_dead_lettered_total{reason})
        client = redis.Redis.from_url(redis_url)
        client.xadd(env["PRICING_EVENTS_STREAM"], {"event": b"\xff\xff not a RelationEvent"})
        client.close()
        wait_for(
            lambda: "sync_dead_lettered_total" in scrape(worker_port),
            "the poison entry is dead-lettered",
            worker,
        )
        exported = scrape(server_port) | scrape(worker_port)
        missing = {name: sorted(where) for name, where in used.items() if name not in exported}
        assert not missing, f"used but not exported: {missing}"
        server_names, worker_names = scrape(server_port), scrape(worker_port)
        for names in (server_names, worker_names):  # the runtime collectors, on both
            assert {"process_resident_memory_bytes", "python_gc_collections_total"} <= names
        assert not any(n.startswith("sync_") for n in server_names)
        # the configured addresses: the server's on loopback, the worker's on every interface
        assert listening(server_port) == {"0100007F"}
        assert listening(worker_port) == {"00000000"}
    finally:
        assert worker.terminate() == 0, worker.log()
        assert server.terminate() == 0, server.log()


def test_a_bad_metrics_address_stops_the_process_naming_the_variable(tmp_path: Path) -> None:
    for command, var in ((pricing_service, "PRICING_METRICS_ADDR"),
                         (sync_worker, "PRICING_WORKER_METRICS_ADDR")):  # fmt: skip
        env = service_env(
            redis_url="redis://127.0.0.1:1/0",
            namespace="x:",
            tmp=tmp_path,
            extra={var: "0.0.0.0:9464"},
        )
        proc = command(
            env, tmp_path / f"{var}.log", *(() if command is pricing_service else ("consume",))
        )
        code = proc.proc.wait(60)
        proc.kill()
        assert code == 2, proc.log()
        assert var in proc.log() and "not an address to bind" in proc.log()
