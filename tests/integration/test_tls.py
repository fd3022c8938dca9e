"""TLS: gRPC over TLS and mTLS, and rediss:// to a TLS-only Redis, with test-made certificates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import load_settings
from pricing_service.domain import Crowd, CrowdKind, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import make_redis
from pricing_service.server import PricingServer
from pricing_testing.certs import CertFiles, make_certs
from pricing_testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

REQUEST = pricing_pb2.BatchGetLowestPriceRequest(
    user_id="u",
    items=[
        pricing_pb2.PriceQuery(
            item_id="i", list_price=common_pb2.Money(currency_code="CNY", amount_minor=100)
        )
    ],
)


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return make_certs(tmp_path)


async def call(
    target: str, creds: grpc.ChannelCredentials | None
) -> pricing_pb2.BatchGetLowestPriceResponse:
    channel = (
        grpc.aio.secure_channel(target, creds)
        if creds is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        return await stub.BatchGetLowestPrice(REQUEST, timeout=3)


async def test_grpc_over_tls(
    redis_url: str, namespace: str, tmp_path: Path, certs: CertFiles
) -> None:
    settings = load_settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        rule_store_url=f"sqlite:///{tmp_path / 'r.db'}",
        listen="127.0.0.1:0",
        metrics_port=0,
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        server_runtime="grpcio-aio",  # the runtime that serves TLS
    )
    async with PricingServer(settings) as server:
        target = f"127.0.0.1:{server.port}"
        ok = await call(
            target, grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        )
        assert ok.prices[0].price.amount_minor == 100
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(target, None)  # plaintext to a TLS port
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await call(target, grpc.ssl_channel_credentials())  # untrusted CA


async def test_mutual_tls_requires_a_client_certificate(
    redis_url: str, namespace: str, tmp_path: Path, certs: CertFiles
) -> None:
    settings = load_settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        rule_store_url=f"sqlite:///{tmp_path / 'r.db'}",
        listen="127.0.0.1:0",
        metrics_port=0,
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.ca),
        server_runtime="grpcio-aio",  # the runtime that serves TLS
    )
    ca = certs.ca.read_bytes()
    async with PricingServer(settings) as server:
        target = f"127.0.0.1:{server.port}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(target, grpc.ssl_channel_credentials(root_certificates=ca))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        ok = await call(
            target,
            grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=certs.client_key.read_bytes(),
                certificate_chain=certs.client_cert.read_bytes(),
            ),
        )
        assert ok.prices[0].price.amount_minor == 100


def test_a_runtime_without_tls_refuses_a_tls_configuration(
    redis_url: str, namespace: str, tmp_path: Path, certs: CertFiles
) -> None:
    """Never a silent plaintext server: the native runtime has no TLS, so TLS settings with it
    stop the process at start-up, naming the variables (in process, and as a command)."""
    from pricing_service.errors import ConfigError  # noqa: PLC0415
    from pricing_testing.procs import run_pricing_service, service_env  # noqa: PLC0415

    tls = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)}
    for extra in ({}, {"tls_client_ca_file": str(certs.ca)}):
        settings = load_settings(server_runtime="native", **tls, **extra)
        with pytest.raises(ConfigError) as caught:
            PricingServer(settings)
        message = caught.value.message
        assert "PRICING_SERVER_RUNTIME=native" in message
        assert "PRICING_TLS_CERT_FILE" in message
        assert "grpcio-aio" in message  # what would serve it
    env = service_env(redis_url=redis_url, namespace=namespace, tmp=tmp_path)
    env.update({
        "PRICING_SERVER_RUNTIME": "native",
        "PRICING_TLS_CERT_FILE": str(certs.server_cert),
        "PRICING_TLS_KEY_FILE": str(certs.server_key),
    })  # fmt: skip
    done = run_pricing_service(env, "serve", timeout=60)
    assert done.returncode == 2, done
    assert "PRICING_SERVER_RUNTIME=native" in done.stderr
    assert "PRICING_TLS_CERT_FILE" in done.stderr
    assert "server_started" not in done.stderr + done.stdout  # nothing listened


@pytest.fixture
def tls_redis(certs: CertFiles) -> Iterator[tuple[RedisServer, int]]:
    tls_port = free_port()
    server = RedisServer(
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "no",
        ]
    )  # fmt: skip
    server.start()
    yield server, tls_port
    server.close()


async def test_rediss_membership_round_trip(
    tls_redis: tuple[RedisServer, int], certs: CertFiles
) -> None:
    _, tls_port = tls_redis
    settings = load_settings(
        redis_url=f"rediss://127.0.0.1:{tls_port}/0", redis_tls_ca_file=str(certs.ca)
    )
    client = make_redis(settings)
    try:
        store = MembershipStore(client, MembershipLayout("tls:"), SystemClock())
        now = SystemClock().now_ms()
        ttls = derive.Ttls.from_seconds(3600, 3600, 30)
        await store.apply(derive.follow("u", "42", now, ttls))
        members = await store.member_crowds("u", [Crowd("42", CrowdKind.ALL_FANS)])
        assert len(members) == 1
    finally:
        await client.aclose()
    untrusted = make_redis(load_settings(redis_url=f"rediss://127.0.0.1:{tls_port}/0"))
    try:
        with pytest.raises(Exception, match=r"(?i)certificate|ssl"):
            await untrusted.ping()
    finally:
        await untrusted.aclose()


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    from pricing_service.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="PRICING_TLS_CERT_FILE"):
        load_settings(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=str(tmp_path / "k"))
    with pytest.raises(ConfigError, match="go together"):
        (tmp_path / "c.pem").write_text("x")
        load_settings(tls_cert_file=str(tmp_path / "c.pem"))
