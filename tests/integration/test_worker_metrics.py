"""The sync worker exports its counters to Prometheus (events applied, dead letters, lag)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from pricing_testing.procs import run_sync_worker, service_env, sync_worker
from pricing_testing.redis_server import free_port

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        body: bytes = r.read()
    return body.decode()


def test_consume_exports_metrics(redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    env = service_env(
        redis_url=redis_url,
        namespace=namespace,
        tmp=tmp_path,
        extra={"PRICING_WORKER_METRICS_PORT": str(port)},
    )
    worker = sync_worker(env, tmp_path / "worker.log", "consume")
    try:
        for user in ("a", "b", "c"):
            published = run_sync_worker(
                env, "publish", "--type", "follow", "--user", user, "--seller", "42"
            )
            assert published.returncode == 0, published.stderr
        stream = env["PRICING_EVENTS_STREAM"]
        want = f'sync_events_applied_total{{stream="{stream}"}} 3.0'
        deadline = time.monotonic() + 15
        body = ""
        while time.monotonic() < deadline:
            try:
                body = scrape(port)
                if want in body:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert want in body, body + worker.log()
        assert "sync_watermark_lag_ms" in body
        assert "sync_replication_unprotected_batches_total" in body
    finally:
        assert worker.terminate() == 0, worker.log()
