"""Contract guards through the real server (``PricingServer``: interceptor, servicers, store):
protobuf Timestamps outside the spec and withdrawn currency codes are refused with
INVALID_ARGUMENT naming the field, nothing is written; current codes (XCG, VED) work."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import load_settings
from pricing_service.server import PricingServer
from pricing_testing.procs import pricing_service, service_env
from tests.support.status import status_details

pytestmark = pytest.mark.integration

AUTH = (("authorization", "Bearer guard-token"),)
S = 1_900_000_000  # a valid second (2030)


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.admin = admin_pb2_grpc.DiscountAdminServiceStub(channel)
        self.pricing = pricing_pb2_grpc.PricingServiceStub(channel)


@pytest.fixture
async def stubs(redis_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Stubs]:
    settings = load_settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        rule_store_url=f"sqlite:///{tmp_path / 'rules.db'}",
        listen="127.0.0.1:0",
        metrics_port=0,
        admin_token="guard-token",
    )
    async with (
        PricingServer(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield Stubs(channel)


def rule(item: str = "1001", currency: str = "CNY") -> admin_pb2.DiscountRule:
    return admin_pb2.DiscountRule(
        seller_id="42",
        item_id=item,
        crowd=common_pb2.CROWD_KIND_ALL_FANS,
        price=common_pb2.Money(currency_code=currency, amount_minor=1888),
    )


async def refused(call: Any) -> tuple[str, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return status_details(caught.value)


async def stored(stubs: Stubs) -> list[admin_pb2.DiscountRule]:
    r = await stubs.admin.ListDiscountRules(
        admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=AUTH, timeout=5
    )
    return list(r.rules)


BAD_TIMES = [
    ("end_time", S, -1, "nanos"),
    ("end_time", S, 1_000_000_000, "nanos"),
    ("start_time", S, -999_999_999, "nanos"),
    ("start_time", 253_402_300_800, 0, "seconds"),  # 10000-01-01
    ("end_time", -62_135_596_801, 0, "seconds"),  # before 0001-01-01
]


@pytest.mark.parametrize(("when", "seconds", "nanos", "part"), BAD_TIMES)
async def test_upsert_refuses_timestamps_outside_the_spec(
    stubs: Stubs, when: str, seconds: int, nanos: int, part: str
) -> None:
    r = rule()
    getattr(r, when).seconds, getattr(r, when).nanos = seconds, nanos
    reason, fields = await refused(
        stubs.admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=r), metadata=AUTH, timeout=5
        )
    )
    assert reason == "INVALID_TIMESTAMP"
    assert fields == [(f"rule.{when}.{part}", "INVALID_TIMESTAMP")]
    assert await stored(stubs) == []  # nothing written (before: {S, -1} stored as S - 1 ms)


@pytest.mark.parametrize(("when", "seconds", "nanos", "part"), BAD_TIMES)
async def test_batch_upsert_refuses_timestamps_outside_the_spec(
    stubs: Stubs, when: str, seconds: int, nanos: int, part: str
) -> None:
    good, bad = rule("1001"), rule("1002")
    getattr(bad, when).seconds, getattr(bad, when).nanos = seconds, nanos
    reason, fields = await refused(
        stubs.admin.BatchUpsertDiscountRules(
            admin_pb2.BatchUpsertDiscountRulesRequest(rules=[good, bad]), metadata=AUTH, timeout=5
        )
    )
    assert reason == "INVALID_TIMESTAMP"
    assert fields == [(f"rules[1].{when}.{part}", "INVALID_TIMESTAMP")]
    assert await stored(stubs) == []  # the valid rule of the batch is not written either


async def test_timestamps_at_the_edges_of_the_spec_are_exact(stubs: Stubs) -> None:
    r = rule()
    r.start_time.seconds, r.start_time.nanos = S, 999_999_999
    r.end_time.seconds, r.end_time.nanos = S + 1, 0
    written = await stubs.admin.UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(rule=r), metadata=AUTH, timeout=5
    )
    assert written.rule.start_time.ToMilliseconds() == S * 1000 + 999  # ms: truncated, not rounded
    assert written.rule.end_time.ToMilliseconds() == (S + 1) * 1000


@pytest.mark.parametrize("code", ["XCG", "VED"])
async def test_current_currencies_are_accepted(stubs: Stubs, code: str) -> None:
    written = await stubs.admin.UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(rule=rule(currency=code)), metadata=AUTH, timeout=5
    )
    assert written.rule.price.currency_code == code
    page = await stubs.pricing.BatchGetLowestPrice(
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="nobody",
            items=[
                pricing_pb2.PriceQuery(
                    item_id="1001",
                    list_price=common_pb2.Money(currency_code=code, amount_minor=2500),
                )
            ],
        ),
        timeout=5,
    )
    assert page.prices[0].price == common_pb2.Money(currency_code=code, amount_minor=2500)


@pytest.mark.parametrize("code", ["ANG", "BGN"])
async def test_withdrawn_currencies_are_refused(stubs: Stubs, code: str) -> None:
    reason, fields = await refused(
        stubs.admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=rule(currency=code)), metadata=AUTH, timeout=5
        )
    )
    assert (reason, fields) == (
        "UNKNOWN_CURRENCY",
        [("rule.price.currency_code", "UNKNOWN_CURRENCY")],
    )
    reason, fields = await refused(
        stubs.pricing.BatchGetLowestPrice(
            pricing_pb2.BatchGetLowestPriceRequest(
                user_id="u",
                items=[
                    pricing_pb2.PriceQuery(item_id="1"),
                    pricing_pb2.PriceQuery(
                        item_id="2",
                        list_price=common_pb2.Money(currency_code=code, amount_minor=100),
                    ),
                ],
            ),
            timeout=5,
        )
    )
    assert reason == "UNKNOWN_CURRENCY"
    assert fields == [("items[1].list_price.currency_code", "UNKNOWN_CURRENCY")]
    assert await stored(stubs) == []


def test_a_failing_server_writes_only_json_lines(tmp_path: Path) -> None:
    """psycopg's own (stdlib) warnings while the rule store is unreachable, and the final
    failure, are JSON lines like the server's own."""
    env = service_env(
        redis_url="redis://127.0.0.1:1/0",
        namespace="unused:",
        tmp=tmp_path,
        extra={"PRICING_RULE_STORE_URL": "postgresql://postgres@127.0.0.1:1/none"},
    )
    proc = pricing_service(env, tmp_path / "server.log")
    code = proc.proc.wait(90)
    proc.kill()
    text = proc.log()
    assert code == 1, text
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert any(e.get("logger") == "psycopg.pool" for e in events), text
    assert events[-1]["event"] == "server_failed"
    assert events[-1]["reason"] == "RULE_STORE_UNAVAILABLE"
