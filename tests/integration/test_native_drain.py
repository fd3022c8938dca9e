"""The native runtime's drain when no quiet moment comes (``pricing_service.runtime.native``).

pygrpc-native 0.5 cannot stop taking new streams while it finishes the open ones, so the drain
serves every call until none has been in flight for a few milliseconds, then closes. Under
load that never pauses, it stops taking new calls after ``DRAIN_SERVE_S`` and closes once those
in flight are answered: the calls then waiting in the front end with UNAVAILABLE at the close,
never served and never refused before it. (The rolling restart under load, two servers on one
port, is in the fault suite: ``test_pricing_server_sigterm_under_load``.)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.runtime.native import DRAIN_SERVE_S
from pricing_testing.load import now_ms
from pricing_testing.procs import pricing_service, service_env, wait_serving
from pricing_testing.redis_server import RedisServer
from tests.support.rpcs import upsert_fan_rule

pytestmark = pytest.mark.integration

CALLERS = 6


@dataclass(frozen=True, slots=True)
class Sent:
    request_id: str
    start_ms: float
    end_ms: float
    code: grpc.StatusCode


def caller(target: str, n: int, stop: threading.Event, out: list[Sent]) -> None:
    """Calls one after the other on a connection of its own, until ``stop`` or a failure."""
    page = pricing_pb2.BatchGetLowestPriceRequest(
        user_id=f"u{n}",
        items=[
            pricing_pb2.PriceQuery(
                item_id="1001", list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500)
            )
        ],
    )
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pricing_pb2_grpc.PricingServiceStub(ch)
        k = 0
        while not stop.is_set():
            k += 1
            rid = f"c{n}-{k}"
            start = now_ms()
            try:
                stub.BatchGetLowestPrice(page, timeout=10, metadata=(("x-request-id", rid),))
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            out.append(Sent(rid, start, now_ms(), code))
            if code != grpc.StatusCode.OK:
                return  # one server only: nothing to go to after its close


def test_under_unbroken_load_the_drain_stops_taking_calls_and_refuses_none_before_the_close(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    env = service_env(
        redis_url=private_redis.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_SERVER_RUNTIME": "native",
            "PRICING_MEMBERSHIP_BUDGET_MS": "3000",
            "PRICING_BREAKER_FAILURE_THRESHOLD": "1000",
            "PRICING_REDIS_SOCKET_TIMEOUT_MS": "5000",
            "PRICING_GRACE_PERIOD_S": "10",
        },
    )
    server = pricing_service(env, tmp_path / "server.log")
    stop = threading.Event()
    sent: list[Sent] = []
    threads = [
        threading.Thread(target=caller, args=(env["PRICING_LISTEN"], n, stop, sent))
        for n in range(CALLERS)
    ]
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            upsert_fan_rule(channel, 1990)  # a page then needs the buyer's membership (Redis)
        time.sleep(0.3)  # the index's refresh
        for t in threads:
            t.start()
        time.sleep(0.5)
        # every call now waits for Redis, past DRAIN_SERVE_S: no quiet moment comes
        private_redis.pause()
        time.sleep(0.1)
        signalled = now_ms()
        server.proc.send_signal(15)
        time.sleep(DRAIN_SERVE_S + 0.2)
        private_redis.resume()
        assert server.proc.wait(20) == 0, server.log()
    finally:
        private_redis.resume()
        stop.set()
        for t in threads:
            t.join(20)
        server.kill()
    lines = [json.loads(x) for x in server.log().splitlines() if x.startswith("{")]
    events = {e["event"]: e for e in lines}
    assert "native_runtime_drain_stops_taking" in events, server.log()
    assert events["native_runtime_drain_stops_taking"]["in_flight"] >= 1
    closing = events["native_runtime_closing"]["at_ms"]
    served = {e["request_id"]: e["code"] for e in lines if e["event"] == "rpc_finished"}
    by_id = {s.request_id: s for s in sent}
    # every call the server answered reached its client as answered
    answered = [by_id[r] for r, code in served.items() if r in by_id and code == "OK"]
    assert answered
    assert all(s.code == grpc.StatusCode.OK for s in answered), answered  # none lost
    # the calls held across the signal were answered
    held = [s for s in sent if s.start_ms < signalled < s.end_ms]
    assert held and all(s.code == grpc.StatusCode.OK for s in held), held
    failed = [s for s in sent if s.code != grpc.StatusCode.OK]
    assert failed, "no caller was cut off by the close"
    # none refused before the close; none of them served (nothing half-done)
    assert all(s.code == grpc.StatusCode.UNAVAILABLE for s in failed), failed
    assert all(s.end_ms >= closing for s in failed), (closing, failed)
    assert not [s for s in failed if s.request_id in served], served
    assert "server_stopped" in server.log()
    # its accept loop fails every 50 ms once the listener is shut: not a warning each time
    assert "accept failed" not in server.log()
