"""The serving path through real gRPC, a real rule store (SQLite) and a real Redis.

Every verdict of CheckDiscountStrict, its refusals (no watermark, stale watermark, Redis down),
BatchGetLowestPrice's degraded mode (Redis killed or hung), explain, deadlines, admission,
health and metrics.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import TracerProvider

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import Settings, load_settings
from pricing_service.domain import SystemClock
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import make_redis
from pricing_service.server import PricingServer
from pricing_testing.redis_server import RedisServer, free_port
from tests.support.status import status_details

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]
TOKEN = "serving-test-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
TTLS = derive.Ttls.from_seconds(172800, 172800, 30)
ALL, OLD, BOUGHT = (
    common_pb2.CROWD_KIND_ALL_FANS,
    common_pb2.CROWD_KIND_OLD_FANS,
    common_pb2.CROWD_KIND_PURCHASED_FANS,
)


def money(amount: int, currency: str = "CNY") -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, amount_minor=amount)


@dataclass
class Harness:
    settings: Settings
    server: PricingServer
    channel: grpc.aio.Channel
    pricing: pricing_pb2_grpc.PricingServiceStub
    admin: admin_pb2_grpc.DiscountAdminServiceStub
    members: MembershipStore
    redis: aioredis.Redis

    async def rule(
        self,
        item: str,
        crowd: int,
        amount: int,
        *,
        seller: str = "42",
        start_ms: int | None = None,
        end_ms: int | None = None,
        currency: str = "CNY",
    ) -> admin_pb2.DiscountRule:
        r = admin_pb2.DiscountRule(
            seller_id=seller,
            item_id=item,
            crowd=common_pb2.CrowdKind.ValueType(crowd),
            price=money(amount, currency),
        )
        if start_ms is not None:
            r.start_time.FromMilliseconds(start_ms)
        if end_ms is not None:
            r.end_time.FromMilliseconds(end_ms)
        resp = await self.admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=r), metadata=ADMIN, timeout=5
        )
        await self.wait_index(resp.rule.revision)
        return resp.rule

    async def wait_index(self, revision: int) -> None:
        assert self.server.index is not None
        deadline = time.monotonic() + 5
        while self.server.index.revision < revision:
            assert time.monotonic() < deadline, "rule index did not catch up"
            await asyncio.sleep(0.01)

    async def follow(
        self, user: str, seller: str = "42", *, days: int = 1, bought: int = 0
    ) -> None:
        now = SystemClock().now_ms()
        writes = derive.snapshot_row(
            user, seller, now - days * 86_400_000, bought, now - 1000, TTLS
        )
        result = await self.members.apply(writes)
        assert not result.failed_users

    async def fresh_watermark(self) -> None:
        secs, micros = await self.redis.time()
        await self.redis.set(self.members.layout.watermark_key, secs * 1000 + micros // 1000)

    async def batch(
        self, user: str, *items: tuple[str, int | None], explain: bool = False, timeout: float = 5
    ) -> pricing_pb2.BatchGetLowestPriceResponse:
        req = pricing_pb2.BatchGetLowestPriceRequest(user_id=user, explain=explain)
        for item, list_amount in items:
            q = req.items.add(item_id=item)
            if list_amount is not None:
                q.list_price.CopyFrom(money(list_amount))
        return await self.pricing.BatchGetLowestPrice(req, timeout=timeout)

    async def strict(
        self, user: str, item: str, *, expected: int | None = None, rule_id: str = ""
    ) -> pricing_pb2.CheckDiscountStrictResponse:
        req = pricing_pb2.CheckDiscountStrictRequest(user_id=user, item_id=item, rule_id=rule_id)
        if expected is not None:
            req.expected_price.CopyFrom(money(expected))
        return await self.strict_raw(req)

    async def strict_raw(
        self, req: pricing_pb2.CheckDiscountStrictRequest
    ) -> pricing_pb2.CheckDiscountStrictResponse:
        return await self.pricing.CheckDiscountStrict(req, timeout=5)


async def start_harness(
    redis_url: str,
    namespace: str,
    tmp: Path,
    *,
    tracer_provider: TracerProvider | None = None,
    propagate_traces: bool = True,
    **overrides: object,
) -> Harness:
    options: dict[str, object] = {
        "redis_url": redis_url,
        "redis_namespace": namespace,
        "rule_store_url": f"sqlite:///{tmp / 'rules.db'}",
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "admin_token": TOKEN,
        "rule_refresh_interval_ms": 50,
        "redis_socket_timeout_ms": 500,
        "breaker_reset_ms": 200,
    }
    settings = load_settings(**(options | overrides))
    server = PricingServer(
        settings, tracer_provider=tracer_provider, propagate_traces=propagate_traces
    )
    await server.__aenter__()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    redis = make_redis(settings)
    members = MembershipStore(redis, MembershipLayout(namespace), SystemClock())
    return Harness(
        settings,
        server,
        channel,
        pricing_pb2_grpc.PricingServiceStub(channel),
        admin_pb2_grpc.DiscountAdminServiceStub(channel),
        members,
        redis,
    )


async def stop_harness(h: Harness) -> None:
    await h.channel.close()
    await h.server.shutdown()
    await h.redis.aclose()


@pytest.fixture
async def h(redis_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await start_harness(redis_url, namespace, tmp_path)
    yield harness
    await stop_harness(harness)


def error_info(err: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    reason, violations = status_details(err)
    return reason, [field for field, _ in violations]


# --- BatchGetLowestPrice ----------------------------------------------------------------------


async def test_lowest_applicable_price_per_item_in_request_order(h: Harness) -> None:
    all_fans = await h.rule("i1", ALL, 1990)
    await h.rule("i1", OLD, 1888)
    bought = await h.rule("i1", BOUGHT, 1750)
    await h.rule("i2", ALL, 8900, seller="7")
    await h.follow("old_buyer", days=90, bought=2)
    await h.follow("new_fan", days=2)

    r = await h.batch("old_buyer", ("i2", 9900), ("i1", 2500), ("nope", 100), ("i1", None))
    assert not r.degraded
    assert [p.item_id for p in r.prices] == ["i2", "i1", "nope", "i1"]
    assert [(p.discounted, p.price.amount_minor) for p in r.prices] == [
        (False, 9900),
        (True, 1750),
        (False, 100),
        (True, 1750),
    ]
    assert r.prices[1].rule_id == bought.rule_id and r.prices[1].crowd == BOUGHT
    assert r.prices[1].seller_id == "42"

    r = await h.batch("new_fan", ("i1", 2500))
    assert r.prices[0].rule_id == all_fans.rule_id and r.prices[0].price.amount_minor == 1990

    r = await h.batch("new_fan", ("i1", 1500))  # every rule above the list price
    assert not r.prices[0].discounted and r.prices[0].price.amount_minor == 1500

    r = await h.batch("", ("i1", 2500))  # anonymous: no crowd discounts
    assert not r.prices[0].discounted

    r = await h.batch("nobody", ("nope", None))
    assert not r.prices[0].HasField("price")


async def test_explain_gives_every_candidate_and_its_outcome(h: Harness) -> None:
    now = SystemClock().now_ms()
    await h.rule("i1", ALL, 1990)
    await h.rule("i1", OLD, 1888, start_ms=now + 3_600_000)
    await h.rule("i1", BOUGHT, 2600)
    await h.rule("i2", ALL, 500, end_ms=now - 1)
    await h.follow("fan", days=1, bought=1)
    r = await h.batch("fan", ("i1", 2500), ("i2", 900), explain=True)
    outcomes = {(e.crowd, e.outcome) for e in r.prices[0].evaluations}
    assert outcomes == {
        (ALL, pricing_pb2.RULE_OUTCOME_APPLIED),
        (OLD, pricing_pb2.RULE_OUTCOME_NOT_STARTED),
        (BOUGHT, pricing_pb2.RULE_OUTCOME_ABOVE_LIST_PRICE),
    }
    assert [e.outcome for e in r.prices[1].evaluations] == [pricing_pb2.RULE_OUTCOME_ENDED]
    r = await h.batch("stranger", ("i1", 2500), explain=True)
    assert pricing_pb2.RULE_OUTCOME_NOT_A_MEMBER in {e.outcome for e in r.prices[0].evaluations}
    r = await h.batch("fan", ("i1", 2500))
    assert not r.prices[0].evaluations  # only on request


async def test_unfollow_ends_every_crowd_of_the_seller(h: Harness) -> None:
    await h.rule("i1", BOUGHT, 1750)
    await h.follow("fan", days=90, bought=1)
    assert (await h.batch("fan", ("i1", 2500))).prices[0].discounted
    now = SystemClock().now_ms()
    await h.members.apply(derive.unfollow("fan", "42", now, TTLS))
    assert not (await h.batch("fan", ("i1", 2500))).prices[0].discounted


# --- degraded mode, deadlines, admission ------------------------------------------------------


@pytest.fixture
async def hp(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> AsyncIterator[tuple[Harness, RedisServer]]:
    harness = await start_harness(private_redis.url, namespace, tmp_path)
    yield harness, private_redis
    await stop_harness(harness)


async def test_redis_killed_answers_list_prices_degraded_and_recovers(
    hp: tuple[Harness, RedisServer],
) -> None:
    h, server = hp
    await h.rule("i1", ALL, 1990)
    await h.follow("fan")
    assert (await h.batch("fan", ("i1", 2500))).prices[0].discounted
    server.kill()
    for _ in range(20):  # also opens the breaker: later answers do not wait at all
        t0 = time.monotonic()
        r = await h.batch("fan", ("i1", 2500), ("i2", 300), timeout=1)
        assert time.monotonic() - t0 < 0.9  # within the 1 s deadline, even on a loaded machine
        assert r.degraded
        assert [(p.discounted, p.price.amount_minor) for p in r.prices] == [
            (False, 2500),
            (False, 300),
        ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.strict("fan", "i1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value)[0] in ("REDIS_UNAVAILABLE", "REDIS_TIMEOUT")
    # an anonymous page needs no membership: never degraded
    assert not (await h.batch("", ("i1", 2500))).degraded

    server.start()  # same port, empty data: reload membership, answers are fresh again
    await h.follow("fan")
    deadline = time.monotonic() + 5
    while True:
        r = await h.batch("fan", ("i1", 2500))
        if not r.degraded:
            break
        assert time.monotonic() < deadline, "never recovered"
        await asyncio.sleep(0.05)
    assert r.prices[0].discounted


async def test_hung_redis_degrades_within_the_callers_deadline(
    hp: tuple[Harness, RedisServer],
) -> None:
    h, server = hp
    await h.rule("i1", ALL, 1990)
    await h.follow("fan")
    server.pause()
    try:
        t0 = time.monotonic()
        r = await h.batch("fan", ("i1", 2500), timeout=0.3)
        elapsed = time.monotonic() - t0
        assert r.degraded and not r.prices[0].discounted
        assert elapsed < 0.3
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.pricing.CheckDiscountStrict(
                pricing_pb2.CheckDiscountStrictRequest(user_id="fan", item_id="i1"), timeout=0.3
            )
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    finally:
        server.resume()


async def test_a_brief_stall_degrades_only_the_calls_in_it(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """Redis stalls for ~0.2 s while 12 pages wait on it: those pages degrade, but it is one
    incident for the breaker (not 12 failures), so the next page is fresh at once instead of a
    whole reset interval of list prices."""
    h = await start_harness(private_redis.url, namespace, tmp_path, breaker_reset_ms=60_000)
    try:
        await h.rule("i1", ALL, 1990)
        await h.follow("fan")
        assert (await h.batch("fan", ("i1", 2500))).prices[0].discounted
        private_redis.pause()
        try:
            stalled = await asyncio.gather(
                *(h.batch("fan", ("i1", 2500), timeout=2) for _ in range(12))
            )
        finally:
            private_redis.resume()
        assert all(r.degraded for r in stalled)
        assert h.server.metrics.breaker_state._value.get() == 0
        r = await h.batch("fan", ("i1", 2500))
        assert not r.degraded and r.prices[0].discounted
    finally:
        await stop_harness(h)


async def test_remaining_deadline_bounds_the_redis_call(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """With a generous budget (2 s) the caller's shorter deadline (0.4 s) still wins."""
    h = await start_harness(private_redis.url, namespace, tmp_path, membership_budget_ms=2000)
    try:
        await h.rule("i1", ALL, 1990)
        await h.follow("fan")
        private_redis.pause()
        t0 = time.monotonic()
        r = await h.batch("fan", ("i1", 2500), timeout=0.4)
        assert time.monotonic() - t0 < 0.4
        assert r.degraded and r.prices[0].price.amount_minor == 2500
    finally:
        private_redis.resume()
        await stop_harness(h)


async def test_too_many_in_flight_is_resource_exhausted(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    h = await start_harness(
        private_redis.url, namespace, tmp_path, max_concurrent_rpcs=2, membership_budget_ms=500
    )
    try:
        await h.rule("i1", ALL, 1990)
        private_redis.pause()  # every membership lookup now waits for its budget
        results = await asyncio.gather(
            *(h.batch(f"u{i}", ("i1", 2500), timeout=3) for i in range(6)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert errors, results
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert {error_info(e)[0] for e in errors} == {"TOO_MANY_IN_FLIGHT"}
        assert len(errors) <= 4
    finally:
        private_redis.resume()
        await stop_harness(h)


# --- a bounded rule index -------------------------------------------------------------------


async def test_a_bounded_index_prices_its_misses_from_the_store(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """PRICING_RULE_INDEX_MAX_ITEMS below the catalogue: the page's misses are read from the
    store in one query, every price is right, changes reach held and unheld items alike."""
    h = await start_harness(redis_url, namespace, tmp_path, rule_index_max_items=2)
    try:
        amounts = {"i1": 1990, "i2": 1890, "i3": 1790, "i4": 1690}
        for item, amount in amounts.items():
            await h.rule(item, ALL, amount)
        await h.follow("fan")
        index = h.server.index
        assert index is not None and not index.complete
        page = [(i, 2500) for i in amounts] + [("plain", 100)]
        for _ in range(2):  # twice: held items, evicted ones and the known-empty one
            r = await h.batch("fan", *page)
            assert not r.degraded
            assert [(p.discounted, p.price.amount_minor) for p in r.prices] == [
                (True, a) for a in amounts.values()
            ] + [(False, 100)]
            assert index.items <= 2
        assert index.misses >= 5
        r = await h.batch("stranger", *page)
        assert not any(p.discounted for p in r.prices)
        # a change to a held item (through the feed) and to an unheld one (its next read)
        held = next(i for i in amounts if index.lookup([i]) != [None])
        unheld = next(i for i in amounts if index.lookup([i]) == [None])
        await h.rule(held, ALL, 1111)
        await h.rule(unheld, ALL, 1222)
        r = await h.batch("fan", (held, 2500), (unheld, 2500))
        assert [p.price.amount_minor for p in r.prices] == [1111, 1222]
        missed = h.server.metrics.rule_index_lookups_miss._value.get()
        assert missed == index.misses
    finally:
        await stop_harness(h)


async def test_rule_store_failing_on_a_miss_degrades_only_the_misses(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Held items keep their discount, missed ones get the list price, the page says degraded;
    after a few failures the rule-store breaker stops trying for a while."""
    h = await start_harness(
        redis_url, namespace, tmp_path, rule_index_max_items=1, breaker_reset_ms=60_000
    )
    try:
        await h.rule("i1", ALL, 1990)
        await h.rule("i2", ALL, 1890)
        await h.follow("fan")
        assert (await h.batch("fan", ("i1", 2500))).prices[0].discounted  # i1 held now
        assert h.server.core is not None
        await h.server.core.rules.close()  # type: ignore[attr-defined]  # reads now fail
        for _ in range(6):
            t0 = time.monotonic()
            r = await h.batch("fan", ("i1", 2500), ("i2", 2500), timeout=2)
            assert time.monotonic() - t0 < 1
            assert r.degraded
            assert [(p.discounted, p.price.amount_minor) for p in r.prices] == [
                (True, 1990),
                (False, 2500),
            ]
        degraded = h.server.metrics.degraded_answers
        assert degraded.labels("rule_store_error")._value.get() == 5
        assert degraded.labels("rule_breaker_open")._value.get() == 1
        assert h.server.metrics.rule_breaker_state._value.get() == 1
        # a page of held items only needs no store
        r = await h.batch("fan", ("i1", 2500))
        assert not r.degraded and r.prices[0].discounted
    finally:
        await stop_harness(h)


# --- CheckDiscountStrict ------------------------------------------------------------------------


async def test_every_strict_verdict(h: Harness) -> None:
    now = SystemClock().now_ms()
    r_all = await h.rule("i1", ALL, 1990)
    r_old = await h.rule("i1", OLD, 1888)
    await h.rule("later", ALL, 100, start_ms=now + 3_600_000)
    await h.follow("old_fan", days=90)
    await h.follow("new_fan", days=2)
    await h.fresh_watermark()

    v = await h.strict("old_fan", "i1")
    assert (v.verdict, v.eligible, v.price.amount_minor, v.rule_id, v.crowd) == (
        pricing_pb2.VERDICT_ELIGIBLE, True, 1888, r_old.rule_id, OLD,
    )  # fmt: skip
    assert v.membership_as_of.ToMilliseconds() > now - 10_000
    assert v.rule_revision >= r_old.revision

    v = await h.strict("old_fan", "i1", expected=1888)
    assert v.verdict == pricing_pb2.VERDICT_ELIGIBLE
    v = await h.strict("old_fan", "i1", expected=1990)
    assert (v.verdict, v.eligible, v.price.amount_minor) == (
        pricing_pb2.VERDICT_PRICE_MISMATCH,
        False,
        1888,
    )
    v = await h.strict("old_fan", "i1", rule_id=r_all.rule_id)  # a lower rule applies
    assert (v.verdict, v.rule_id) == (pricing_pb2.VERDICT_PRICE_MISMATCH, r_old.rule_id)
    v = await h.strict("new_fan", "i1", rule_id=r_old.rule_id)
    assert v.verdict == pricing_pb2.VERDICT_NOT_IN_CROWD and not v.eligible
    v = await h.strict("new_fan", "i1")
    assert (v.verdict, v.price.amount_minor) == (pricing_pb2.VERDICT_ELIGIBLE, 1990)
    v = await h.strict("stranger", "i1")
    assert v.verdict == pricing_pb2.VERDICT_NOT_IN_CROWD and not v.HasField("price")
    v = await h.strict("old_fan", "no-such-item")
    assert v.verdict == pricing_pb2.VERDICT_NO_RULE
    v = await h.strict("old_fan", "i1", rule_id="no-such-rule")
    assert v.verdict == pricing_pb2.VERDICT_NO_RULE
    v = await h.strict("old_fan", "later")
    assert v.verdict == pricing_pb2.VERDICT_RULE_NOT_ACTIVE and not v.eligible


async def test_strict_reads_the_store_not_the_index(h: Harness) -> None:
    """A rule change is visible to checkout at once, even before the index refreshes."""
    await h.follow("fan")
    await h.fresh_watermark()
    resp = await h.admin.UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(
            rule=admin_pb2.DiscountRule(
                seller_id="42", item_id="fresh", crowd=ALL, price=money(700)
            )
        ),
        metadata=ADMIN,
        timeout=5,
    )
    v = await h.strict("fan", "fresh")  # no wait for the index
    assert v.verdict == pricing_pb2.VERDICT_ELIGIBLE and v.rule_id == resp.rule.rule_id


async def test_strict_refuses_without_a_fresh_watermark(h: Harness) -> None:
    await h.rule("i1", ALL, 1990)
    await h.follow("fan")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.strict("fan", "i1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value)[0] == "SYNC_WATERMARK_MISSING"

    secs, micros = await h.redis.time()
    stale = secs * 1000 + micros // 1000 - h.settings.strict_max_lag_ms - 500
    await h.redis.set(h.members.layout.watermark_key, stale)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.strict("fan", "i1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value)[0] == "SYNC_LAGGING"

    await h.fresh_watermark()
    assert (await h.strict("fan", "i1")).eligible


async def test_strict_refusals_of_bad_input(h: Harness) -> None:
    cases = [
        (pricing_pb2.CheckDiscountStrictRequest(item_id="i1"), "user_id", "MISSING_ID"),
        (pricing_pb2.CheckDiscountStrictRequest(user_id="u"), "item_id", "MISSING_ID"),
        (
            pricing_pb2.CheckDiscountStrictRequest(user_id="u", item_id="i" * 500),
            "item_id",
            "ID_TOO_LONG",
        ),
        (
            pricing_pb2.CheckDiscountStrictRequest(
                user_id="u", item_id="i1", expected_price=money(0)
            ),
            "expected_price.amount_minor",
            "ZERO_PRICE",
        ),
        (
            pricing_pb2.CheckDiscountStrictRequest(user_id="u\n", item_id="i1"),
            "user_id",
            "INVALID_ID",
        ),
    ]
    for req, field, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.strict_raw(req)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value) == (reason, [field])


async def test_a_list_price_set_without_a_currency_is_refused_an_unset_one_is_none(
    h: Harness,
) -> None:
    """An item without a list price answers without one; a list price that is set but empty
    (no currency, any amount) is the caller's error naming the item, not a missing price."""
    await h.rule("i1", ALL, 1990)
    r = await h.batch("u", ("i1", None), ("i1", 2500))
    assert not r.prices[0].HasField("price") and not r.prices[0].discounted  # no list price
    assert r.prices[1].price.amount_minor == 2500
    for empty in (common_pb2.Money(), common_pb2.Money(amount_minor=5)):
        req = pricing_pb2.BatchGetLowestPriceRequest(user_id="u")
        req.items.add(item_id="i1")
        req.items.add(item_id="i1", list_price=empty)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.pricing.BatchGetLowestPrice(req, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _reason, fields = error_info(caught.value)
        assert fields and all(f.startswith("items[1].list_price") for f in fields), fields


# --- operability ------------------------------------------------------------------------------


async def test_health_follows_redis_and_shutdown(hp: tuple[Harness, RedisServer]) -> None:
    h, server = hp
    health = health_pb2_grpc.HealthStub(h.channel)

    async def status(service: str = "") -> int:
        return int(
            (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status
        )

    assert await status() == health_pb2.HealthCheckResponse.SERVING
    assert await status("pricing.v1.PricingService") == health_pb2.HealthCheckResponse.SERVING
    server.kill()
    deadline = time.monotonic() + 5
    while await status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    server.start()
    deadline = time.monotonic() + 5
    while await status() != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_metrics_endpoint(
    redis_url: str, namespace: str, tmp_path: Path, server_runtime: str
) -> None:
    port = free_port()
    h = await start_harness(redis_url, namespace, tmp_path, metrics_port=port)
    try:
        await h.rule("i1", ALL, 1990)
        await h.batch("fan", ("i1", 2500))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.batch("fan")
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        assert 'pricing_rpc_requests_total{code="OK",method="BatchGetLowestPrice"} 1.0' in body
        assert 'code="INVALID_ARGUMENT",method="BatchGetLowestPrice"' in body
        assert "pricing_rpc_latency_seconds_bucket" in body
        assert "pricing_rule_index_revision" in body
        assert "pricing_redis_round_trip_seconds" in body
        if server_runtime == "native":
            # the front's own time per call, and the loop's waits and receives (the pump
            # took both calls itself or through its thread: at least one receive found them)
            assert (
                'pricing_runtime_call_seconds_count{code="OK",method="BatchGetLowestPrice"}' in body
            )
            pump = {
                line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                for line in body.splitlines()
                if line.startswith("pricing_native_pump_total{")
            }
            assert set(pump) == {"waits", "receives", "receives_empty", "blocking_waits"}
            assert pump["waits"] >= pump["receives"] >= pump["receives_empty"] >= 0
            assert pump["waits"] > 0
    finally:
        await stop_harness(h)


async def test_requests_are_rate_bounded_per_caller(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    h = await start_harness(redis_url, namespace, tmp_path, rate_limit_rps=5, rate_limit_burst=5)
    try:
        codes = []
        for _ in range(8):
            try:
                await h.batch("u", ("i1", 100))
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
                assert error_info(err)[0] == "RATE_LIMITED"
        assert codes[:5] == [grpc.StatusCode.OK] * 5
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[5:]
        # another caller (another token) has its own budget
        other = await h.pricing.BatchGetLowestPrice(
            pricing_pb2.BatchGetLowestPriceRequest(
                user_id="u", items=[pricing_pb2.PriceQuery(item_id="i1")]
            ),
            metadata=(("authorization", "Bearer someone-else"),),
            timeout=5,
        )
        assert len(other.prices) == 1
    finally:
        await stop_harness(h)


async def test_strict_refuses_promptly_when_redis_hangs(
    private_redis: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """A refusal must come before the caller's deadline, not as a timeout."""
    h = await start_harness(private_redis.url, namespace, tmp_path, strict_budget_ms=300)
    try:
        await h.rule("i1", ALL, 1990)
        await h.follow("fan")
        await h.fresh_watermark()
        assert (await h.strict("fan", "i1")).eligible
        private_redis.pause()
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.pricing.CheckDiscountStrict(
                pricing_pb2.CheckDiscountStrictRequest(user_id="fan", item_id="i1"), timeout=5
            )
        assert time.monotonic() - t0 < 2.0
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value)[0] == "REDIS_TIMEOUT"
    finally:
        private_redis.resume()
        await stop_harness(h)
