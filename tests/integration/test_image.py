"""The container image, built here from the Dockerfile on a debootstrapped Debian base
(no image registry is reachable), runs ``pricing-service serve`` as UID 10001 against a Redis
the test provides and answers gRPC from outside the container.

Marked ``image``; ``make test`` runs it where buildah and debootstrap are installed
(scripts/install_test_deps.sh installs them where apt is) and sets PRICING_TEST_REQUIRE_IMAGE=1
then, so that a missing tool fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.redis_server import RedisServer, free_port
from tests.support import image
from tests.support.rpcs import upsert_fan_rule

pytestmark = [pytest.mark.integration, pytest.mark.image]

TAG = "localhost/crowd-pricing:test"
REQUIRE = os.environ.get("PRICING_TEST_REQUIRE_IMAGE", "") not in ("", "0", "false")


@pytest.fixture(scope="module")
def built_image() -> Iterator[str]:
    missing = image.missing_tools()
    if missing:
        msg = f"{', '.join(missing)} not installed (apt-get install buildah debootstrap)"
        if REQUIRE:
            pytest.fail(msg + " and PRICING_TEST_REQUIRE_IMAGE=1", pytrace=False)
        pytest.skip(msg)
    started = time.monotonic()
    base = image.ensure_base()
    base_s = time.monotonic() - started
    build_s = image.build_image(TAG, base=base)
    print(f"image: base ready in {base_s:.1f} s, build {build_s:.1f} s")  # shown with -s
    yield TAG


def logged_pid(log: Path) -> int | None:
    """The server's pid from its ``server_started`` line, if it is this container's server."""
    for line in log.read_text(errors="replace").splitlines():
        if '"server_started"' in line:
            pid = int(json.loads(line)["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            return pid if b"pricing-service" in cmdline else None
    return None


def test_image_runs_as_numeric_non_root_user(built_image: str) -> None:
    assert image.image_config(built_image, ".OCIv1.Config.User") == "10001:10001"
    assert image.image_config(built_image, ".OCIv1.Config.Entrypoint") == "[pricing-service]"


def test_server_in_the_image_answers_grpc_from_outside(
    built_image: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    port, metrics = free_port(), free_port()
    env = {
        "PRICING_REDIS_URL": private_redis.url,
        "PRICING_LISTEN": f"127.0.0.1:{port}",
        "PRICING_METRICS_PORT": str(metrics),
        "PRICING_ADMIN_TOKEN": "test-admin-token",
        "PRICING_RULE_REFRESH_INTERVAL_MS": "100",
    }
    ctr = image.run("buildah", "from", built_image).strip()
    log = (tmp_path / "container.log").open("wb")
    flags = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    # buildah run: the host's network (chroot isolation), the image's user, env and workdir
    proc = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", *flags, ctr, "--", "pricing-service", "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
            logs = (tmp_path / "container.log").read_text(errors="replace")
            assert status == health_pb2.HealthCheckResponse.SERVING, logs
            for name in ("pricing.v1.PricingService", "pricing.v1.DiscountAdminService"):
                r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                assert r.status == health_pb2.HealthCheckResponse.SERVING

            upsert_fan_rule(channel, 1500)  # written to /data/pricing.db inside, as UID 10001
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            request = pricing_pb2.BatchGetLowestPriceRequest(
                user_id="stranger",
                items=[
                    pricing_pb2.PriceQuery(
                        item_id="1001",
                        list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500),
                    ),
                    pricing_pb2.PriceQuery(item_id="1002"),
                ],
            )
            deadline = time.monotonic() + 10
            while True:
                page = stub.BatchGetLowestPrice(request, timeout=5)
                if page.rule_revision or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert page.rule_revision == 1 and not page.degraded
            assert [p.item_id for p in page.prices] == ["1001", "1002"]
            assert page.prices[0].price.amount_minor == 2500  # a stranger: the list price
        # the image's PRICING_METRICS_ADDR=0.0.0.0: scrapeable from outside the container
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=3) as r:
            assert b"process_resident_memory_bytes" in r.read()
        who = image.run("buildah", "run", "--isolation", "chroot", ctr, "--", "stat", "-c",
                        "%u", "/data/pricing.db")  # fmt: skip
        assert who.strip() == "10001"
    finally:
        if proc.poll() is None:
            # buildah run answers a signal by killing its command: SIGTERM the server itself
            # (chroot isolation shares the host's PID namespace: the pid it logs is the host's)
            server_pid = logged_pid(tmp_path / "container.log")
            if server_pid is not None:
                os.kill(server_pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
    text = (tmp_path / "container.log").read_text(errors="replace")
    assert '"event":"server_stopped"' in text, text  # SIGTERM reached the server: clean stop
