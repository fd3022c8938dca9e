"""``pricing-service price / check / rules --target / health`` against a real server process
with bearer tokens required, and over TLS with client certificates (mTLS)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricing_testing.certs import CertFiles, make_certs
from pricing_testing.procs import Proc, pricing_service, service_env, wait_serving
from pricing_testing.redis_server import free_port

pytestmark = pytest.mark.integration

READ, ADMIN = "read-secret", "admin-secret"
SERVICES = ("(overall)", "pricing.v1.PricingService", "pricing.v1.DiscountAdminService")


def cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pricing_service", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def health_lines(out: str) -> dict[str, str]:
    pairs = (line.rsplit(maxsplit=1) for line in out.splitlines())
    return {name: status for name, status in pairs}


@pytest.fixture
def token_server(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = service_env(
        redis_url=redis_url,
        namespace=namespace,
        tmp=tmp_path,
        extra={"PRICING_READ_TOKEN": f"{READ},older-read", "PRICING_ADMIN_TOKEN": ADMIN},
    )
    server = pricing_service(env, tmp_path / "server.log")
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        yield env
    finally:
        assert server.terminate() == 0, server.log()


def test_price_check_and_rules_send_the_configured_tokens(
    token_server: dict[str, str], tmp_path: Path
) -> None:
    env = token_server
    up = cli(env, "rules", "upsert", "--target", env["PRICING_LISTEN"], "--seller", "42",
             "--item", "1001", "--crowd", "all_fans", "--price", "18.88", "--currency", "CNY",
             "--actor", "alice")  # fmt: skip
    assert up.returncode == 0, up.stderr
    written = json.loads(up.stdout)
    assert (written["amount_minor"], written["revision"]) == (1888, 1)
    rules_file = tmp_path / "rules.jsonl"
    rules_file.write_text(
        '{"seller_id": "42", "item_id": "1002", "crowd": "old_fans", "price": "9.90",'
        ' "currency": "CNY"}\n'
    )
    imported = cli(env, "rules", "import", str(rules_file), "--target", env["PRICING_LISTEN"])
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 rules for seller(s) 42" in imported.stdout
    listed = cli(env, "rules", "list", "--seller", "42", "--target", env["PRICING_LISTEN"])
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["item_id"] for line in listed.stdout.splitlines()) == [
        "1001",
        "1002",
    ]
    price = cli(env, "price", "--user", "nobody", "--items", "1001=25.00")
    assert price.returncode == 0, price.stderr
    page = json.loads(price.stdout)
    assert page["prices"][0]["price"] == {"currencyCode": "CNY", "amountMinor": "2500"}
    check = cli(env, "check", "--user", "nobody", "--item", "1001")
    assert check.returncode in (0, 1), check.stderr  # eligible or refused: never unauthenticated
    assert "UNAUTHENTICATED" not in check.stderr

    # without the tokens: refused, exit 1, the reason printed
    bare = {k: v for k, v in env.items() if k not in ("PRICING_READ_TOKEN", "PRICING_ADMIN_TOKEN")}
    refused = cli(bare, "price", "--user", "u", "--items", "1001")
    assert refused.returncode == 1 and refused.stderr.startswith("UNAUTHENTICATED"), refused
    no_admin = cli(bare, "rules", "list", "--seller", "42", "--target", env["PRICING_LISTEN"])
    assert no_admin.returncode == 1 and "PRICING_ADMIN_TOKEN" in no_admin.stderr
    wrong = cli({**env, "PRICING_ADMIN_TOKEN": "nope"}, "rules", "list", "--seller", "42",
                "--target", env["PRICING_LISTEN"])  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.startswith("UNAUTHENTICATED"), wrong
    # a refusal's BadRequest fields are printed
    bad = cli(env, "rules", "upsert", "--target", env["PRICING_LISTEN"], "--seller", "43",
              "--item", "1001", "--crowd", "all_fans", "--price", "1", "--currency", "CNY")  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("FAILED_PRECONDITION"), bad


def test_health_prints_every_service(token_server: dict[str, str]) -> None:
    ok = cli(token_server, "health")
    assert ok.returncode == 0, ok.stderr
    assert health_lines(ok.stdout) == dict.fromkeys(SERVICES, "SERVING")
    unknown = cli(token_server, "health", "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert health_lines(unknown.stdout) == {"no.such.Service": "SERVICE_UNKNOWN"}


def test_health_exits_non_zero_when_not_serving(tmp_path: Path) -> None:
    env = service_env(redis_url=f"redis://127.0.0.1:{free_port()}/0", namespace="x:", tmp=tmp_path)
    server = pricing_service(env, tmp_path / "server.log")
    try:
        server.wait_log("server_started")
        sick = cli(env, "health")
        assert sick.returncode == 1, sick.stdout + server.log()
        assert health_lines(sick.stdout) == dict.fromkeys(SERVICES, "NOT_SERVING")
        # the liveness probe's name stays SERVING: a Redis outage is no reason to restart
        alive = cli(env, "health", "--service", "liveness")
        assert alive.returncode == 0 and health_lines(alive.stdout) == {"liveness": "SERVING"}
    finally:
        server.terminate()
    gone = cli(env, "health", "--timeout", "1")
    assert gone.returncode == 1
    assert set(health_lines(gone.stdout).values()) == {"UNREACHABLE"}


def wait_serving_tls(target: str, proc: Proc, certs: CertFiles, timeout: float = 30) -> None:
    creds = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
    )
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(target, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.alive(), proc.log()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("never SERVING over TLS:\n" + proc.log())


def test_cli_over_mutual_tls(redis_url: str, namespace: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    env = service_env(
        redis_url=redis_url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_TLS_CERT_FILE": str(certs.server_cert),
            "PRICING_TLS_KEY_FILE": str(certs.server_key),
            "PRICING_TLS_CLIENT_CA_FILE": str(certs.ca),
            "PRICING_READ_TOKEN": READ,
            "PRICING_ADMIN_TOKEN": ADMIN,
            "PRICING_SERVER_RUNTIME": "grpcio-aio",  # the runtime that serves TLS
        },
    )
    server = pricing_service(env, tmp_path / "server.log")
    try:
        wait_serving_tls(env["PRICING_LISTEN"], server, certs)
        mtls = ("--tls-ca-file", str(certs.ca), "--tls-cert-file", str(certs.client_cert),
                "--tls-key-file", str(certs.client_key))  # fmt: skip
        ok = cli(env, "health", *mtls)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert health_lines(ok.stdout) == dict.fromkeys(SERVICES, "SERVING")
        up = cli(env, "rules", "upsert", "--target", env["PRICING_LISTEN"], *mtls,
                 "--seller", "42", "--item", "1001", "--crowd", "all_fans", "--price", "18.88",
                 "--currency", "CNY")  # fmt: skip
        assert up.returncode == 0, up.stderr
        price = cli(env, "price", "--user", "nobody", "--items", "1001=25.00", *mtls)
        assert price.returncode == 0, price.stderr
        assert json.loads(price.stdout)["prices"][0]["price"]["amountMinor"] == "2500"
        # TLS is on because the settings say the server speaks it; without a client
        # certificate, with an untrusted CA, or in plaintext: refused, exit 1
        no_cert = cli(env, "price", "--user", "u", "--items", "1001",
                      "--tls-ca-file", str(certs.ca), "--timeout", "2")  # fmt: skip
        assert no_cert.returncode == 1 and no_cert.stderr.startswith("UNAVAILABLE"), no_cert
        system_ca = cli(env, "health", "--timeout", "2")
        assert system_ca.returncode == 1
        plain = cli(env, "price", "--user", "u", "--items", "1001", "--plaintext",
                    "--timeout", "2")  # fmt: skip
        assert plain.returncode == 1 and plain.stderr.startswith("UNAVAILABLE"), plain
        half = cli(env, "health", "--tls-cert-file", str(certs.client_cert))
        assert half.returncode == 1 and "go together" in half.stderr
        both = cli(env, "health", "--plaintext", "--tls-ca-file", str(certs.ca))
        assert both.returncode == 1 and "--plaintext excludes" in both.stderr
        no_target = cli(env, "rules", "list", "--seller", "42", "--tls-ca-file", str(certs.ca))
        assert no_target.returncode == 2 and "need --target" in no_target.stderr
    finally:
        assert server.terminate() == 0, server.log()
