"""Process lifecycle: SIGTERM drains in-flight calls; several workers share one port; bad
configuration stops the process at start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.procs import pricing_service, service_env, wait_serving
from pricing_testing.redis_server import RedisServer

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]


def batch(
    stub: pricing_pb2_grpc.PricingServiceStub, user: str, timeout: float = 10
) -> pricing_pb2.BatchGetLowestPriceResponse:
    return stub.BatchGetLowestPrice(
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id=user,
            items=[
                pricing_pb2.PriceQuery(
                    item_id="i1", list_price=common_pb2.Money(currency_code="CNY", amount_minor=100)
                )
            ],
        ),
        timeout=timeout,
    )


def test_sigterm_drains_in_flight_calls(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    env = service_env(
        redis_url=private_redis.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_MEMBERSHIP_BUDGET_MS": "1500",
            "PRICING_BREAKER_FAILURE_THRESHOLD": "1000",
            "PRICING_GRACE_PERIOD_S": "10",
            "PRICING_REDIS_SOCKET_TIMEOUT_MS": "5000",
        },
    )
    server = pricing_service(env, tmp_path / "server.log")
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        # a rule so that a buyer's page needs membership
        admin_env = dict(env)
        upsert = subprocess.run(
            [sys.executable, "-m", "pricing_service", "rules", "upsert", "--seller", "42", "--item", "i1",
             "--crowd", "all_fans", "--price", "0.50", "--currency", "CNY"],
            env=admin_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert upsert.returncode == 0, upsert.stdout + upsert.stderr
        time.sleep(0.6)  # index refresh
        private_redis.pause()  # every lookup now waits for its 1.5 s budget: calls stay in flight
        results: list[object] = []
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)

            def call(i: int) -> None:
                try:
                    results.append(batch(stub, f"u{i}"))
                except grpc.RpcError as err:
                    results.append(err)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.4)
            server.proc.send_signal(15)
            for t in threads:
                t.join(20)
        private_redis.resume()
        assert server.proc.wait(20) == 0, server.log()
        assert len(results) == 8
        failed = [r for r in results if isinstance(r, grpc.RpcError)]
        assert not failed, [(e.code(), e.details()) for e in failed]
        assert all(
            isinstance(r, pricing_pb2.BatchGetLowestPriceResponse) and r.degraded for r in results
        )
        assert "server_stopped" in server.log()
    finally:
        server.kill()


def test_several_workers_share_one_port(redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = service_env(redis_url=redis_url, namespace=namespace, tmp=tmp_path)
    server = pricing_service(env, tmp_path / "server.log", "serve", "--workers", "2")
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        for _ in range(10):  # fresh connections, spread by the kernel over the workers
            with grpc.insecure_channel(
                env["PRICING_LISTEN"], options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = pricing_pb2_grpc.PricingServiceStub(channel)
                assert not batch(stub, "u").degraded
        children = subprocess.run(
            ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(children) == 2, server.log()
        server.proc.send_signal(15)
        assert server.proc.wait(30) == 0, server.log()
        for pid in children:
            status = Path(f"/proc/{pid}/status")
            assert not status.exists() or "zombie" in status.read_text().lower()
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PRICING_LISTEN", "nonsense"),
        ("PRICING_REDIS_URL", "http://x"),
        ("PRICING_TOMBSTONE_TTL_S", "3600"),
        ("PRICING_MAX_BATCH_ITEMS", "0"),
        ("PRICING_RULE_STORE_URL", "mysql://x"),
    ],
)
def test_bad_configuration_fails_at_start_naming_the_variable(
    variable: str, value: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    env[variable] = value
    for program in ("pricing_service", "sync_worker"):
        args = [sys.executable, "-m", program] + (
            ["consume"] if program == "sync_worker" else ["serve"]
        )
        proc = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2, (program, proc.stdout, proc.stderr)
        assert variable in proc.stderr, (program, proc.stderr)
