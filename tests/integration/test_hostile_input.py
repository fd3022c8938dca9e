"""Random and hostile messages at every RPC: never INTERNAL, never a crash, bounded answers.

Hypothesis builds well-formed messages with hostile values (huge, empty, control and
non-ASCII strings; int64 extremes; duplicated ids; oversized batches) and raw byte strings
that are not protobuf at all.
"""

from __future__ import annotations

import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing.v1 import admin_pb2, common_pb2, pricing_pb2
from pricing_service.config import load_settings
from pricing_service.server import PricingServer

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]
TOKEN = "hostile-test-token"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE,  # strict path without a watermark
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # message size limit
    grpc.StatusCode.ALREADY_EXISTS,
}

INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 10**15, 10**15 + 1]),
    st.integers(-(2**63), 2**63 - 1),
)
TEXT = st.one_of(
    st.sampled_from(["", " ", "42", "\x00", "a\nb", "{x}", "💥" * 50, "x" * 5000, "NaN", "-0"]),
    st.text(max_size=300),
)
CURRENCY = st.one_of(st.sampled_from(["CNY", "USD", "JPY", "", "cny", "XXX", "NaN"]), TEXT)
MONEY = st.builds(common_pb2.Money, currency_code=CURRENCY, amount_minor=INT64)
CROWD = st.integers(-5, 10)


@st.composite
def batch_requests(draw: st.DrawFn) -> pricing_pb2.BatchGetLowestPriceRequest:
    req = pricing_pb2.BatchGetLowestPriceRequest(user_id=draw(TEXT), explain=draw(st.booleans()))
    n = draw(st.sampled_from([0, 1, 2, 20, 199, 200, 201, 10_000]))
    ids = draw(st.lists(TEXT, min_size=1, max_size=5))
    for i in range(n):
        q = req.items.add(item_id=ids[i % len(ids)])  # duplicated ids on purpose
        if draw(st.booleans()) if i < 5 else i % 2 == 0:
            q.list_price.CopyFrom(
                draw(MONEY) if i < 5 else common_pb2.Money(currency_code="CNY", amount_minor=i)
            )
    return req


def rules() -> st.SearchStrategy[admin_pb2.DiscountRule]:
    def build(
        seller: str, item: str, crowd: int, price: common_pb2.Money, start: int, end: int, rid: str
    ) -> admin_pb2.DiscountRule:
        r = admin_pb2.DiscountRule(
            rule_id=rid,
            seller_id=seller,
            item_id=item,
            crowd=common_pb2.CrowdKind.ValueType(crowd),
            price=price,
        )
        if start:
            r.start_time.seconds = start
        if end:
            r.end_time.seconds = end
        return r

    seconds = st.one_of(
        st.just(0), st.integers(-(2**40), 2**40), st.sampled_from([253402300799, -62135596800])
    )
    return st.builds(
        build, TEXT, TEXT, CROWD, MONEY, seconds, seconds, st.one_of(st.just(""), TEXT)
    )


@pytest.fixture
async def target(redis_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[str]:
    s = load_settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        rule_store_url=f"sqlite:///{tmp_path / 'r.db'}",
        listen="127.0.0.1:0",
        metrics_port=0,
        admin_token=TOKEN,
        max_message_bytes=1024 * 1024,
    )
    async with PricingServer(s) as server:
        yield f"127.0.0.1:{server.port}"


async def invoke(
    channel: grpc.aio.Channel, method: str, payload: bytes, admin: bool
) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    metadata = (("authorization", f"Bearer {TOKEN}"),) if admin else ()
    try:
        await call(payload, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, (method, err.code(), err.details())
        assert err.code() != grpc.StatusCode.INTERNAL
        return err.code()
    return grpc.StatusCode.OK


PRICING = "/pricing.v1.PricingService/"
ADMIN = "/pricing.v1.DiscountAdminService/"


async def test_hostile_messages_at_every_rpc(target: str) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with grpc.aio.insecure_channel(target) as channel:
        cases: list[tuple[str, bytes, bool]] = []

        @settings(
            max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(
            batch=batch_requests(),
            strict=st.builds(
                pricing_pb2.CheckDiscountStrictRequest,
                user_id=TEXT, item_id=TEXT, rule_id=TEXT, expected_price=MONEY,
            ),
            rule=rules(),
            many=st.lists(rules(), max_size=30),
            ids=TEXT,
            page=st.builds(
                admin_pb2.ListDiscountRulesRequest,
                seller_id=TEXT, item_id=TEXT, page_size=st.integers(-(2**31), 2**31 - 1), page_token=TEXT,
            ),
            garbage=st.binary(max_size=200),
        )  # fmt: skip
        def collect(
            batch: pricing_pb2.BatchGetLowestPriceRequest,
            strict: pricing_pb2.CheckDiscountStrictRequest,
            rule: admin_pb2.DiscountRule,
            many: list[admin_pb2.DiscountRule],
            ids: str,
            page: admin_pb2.ListDiscountRulesRequest,
            garbage: bytes,
        ) -> None:
            cases.extend(
                [
                    (PRICING + "BatchGetLowestPrice", batch.SerializeToString(), False),
                    (PRICING + "CheckDiscountStrict", strict.SerializeToString(), False),
                    (ADMIN + "UpsertDiscountRule", admin_pb2.UpsertDiscountRuleRequest(rule=rule).SerializeToString(), True),
                    (ADMIN + "BatchUpsertDiscountRules", admin_pb2.BatchUpsertDiscountRulesRequest(rules=many).SerializeToString(), True),
                    (ADMIN + "GetDiscountRule", admin_pb2.GetDiscountRuleRequest(rule_id=ids).SerializeToString(), True),
                    (ADMIN + "DeleteDiscountRule", admin_pb2.DeleteDiscountRuleRequest(rule_id=ids).SerializeToString(), True),
                    (ADMIN + "ListDiscountRules", page.SerializeToString(), True),
                    (ADMIN + "ListRuleHistory", admin_pb2.ListRuleHistoryRequest(
                        seller_id=page.seller_id, item_id=page.item_id, page_size=page.page_size,
                        page_token=page.page_token).SerializeToString(), True),
                    (PRICING + "BatchGetLowestPrice", garbage, False),
                    (ADMIN + "UpsertDiscountRule", garbage, True),
                ]
            )  # fmt: skip

        collect()
        codes: dict[str, set[grpc.StatusCode]] = {}
        for method, payload, admin in cases:
            code = await invoke(channel, method, payload, admin)
            codes.setdefault(method, set()).add(code)
        # the server still answers properly afterwards
        ok = await invoke(
            channel,
            PRICING + "BatchGetLowestPrice",
            pricing_pb2.BatchGetLowestPriceRequest(
                user_id="u", items=[pricing_pb2.PriceQuery(item_id="i")]
            ).SerializeToString(),
            False,
        )
        assert ok == grpc.StatusCode.OK
        assert grpc.StatusCode.INVALID_ARGUMENT in codes[PRICING + "BatchGetLowestPrice"]
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 512 * 1024, "max RSS grew by more than 512 MiB"  # KiB units
    assert os.getpid()  # the server ran in this process: reaching here means it did not crash
