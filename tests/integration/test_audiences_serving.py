"""Seller-defined crowds on the serving path: real gRPC server, rule store and Redis.

A page whose rules use built-in, predicate and list crowds of several sellers is still one
HMGET; a predicate turns true by itself when its day comes (no write, no snapshot); the strict
path decides seller crowds from the rule store, so it sees a crowd the index has not yet; a new
predicate crowd applies to every buyer at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pricing.v1 import admin_pb2, common_pb2, pricing_pb2
from pricing_service.domain import ManualClock, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.layout import LAYOUT_VERSION
from pricing_testing.redis_server import RedisServer
from tests.integration.test_serving import ADMIN, Harness, money, start_harness, stop_harness

pytestmark = pytest.mark.integration
DAY = 86_400_000
TTLS = derive.Ttls.from_seconds(172800, 172800, 30)


async def crowd(h: Harness, seller: str, crowd_id: str, **form: object) -> admin_pb2.Crowd:
    r = await h.admin.CreateCrowd(
        admin_pb2.CreateCrowdRequest(
            crowd=admin_pb2.Crowd(seller_id=seller, crowd_id=crowd_id, **form)  # type: ignore[arg-type]
        ),
        metadata=ADMIN,
    )
    return r.crowd


async def rule(h: Harness, seller: str, item: str, crowd_id: str, amount: int) -> int:
    r = await h.admin.UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(
            rule=admin_pb2.DiscountRule(
                seller_id=seller, item_id=item, crowd_id=crowd_id, price=money(amount)
            )
        ),
        metadata=ADMIN,
    )
    return int(r.rule.revision)


async def crowds_visible(h: Harness, n: int) -> None:
    assert h.server.crowds is not None
    for _ in range(200):
        if len(h.server.crowds) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the crowd index did not catch up")


@pytest.fixture
async def h(redis_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await start_harness(redis_url, namespace, tmp_path)
    yield harness
    await stop_harness(harness)


@pytest.fixture
async def hp(tmp_path: Path) -> AsyncIterator[tuple[Harness, RedisServer, ManualClock]]:
    server = RedisServer().start()
    clock = ManualClock(SystemClock().now_ms())
    harness = await start_harness(server.url, "a:", tmp_path)
    harness.server.clock = clock  # the page path reads the core's and the store's
    assert harness.server.core is not None
    harness.server.core.clock = clock
    harness.server.core.membership.clock = clock
    yield harness, server, clock
    await stop_harness(harness)
    server.close()


async def hmgets(r: aioredis.Redis) -> int:
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_a_page_of_mixed_crowds_is_one_hmget_and_predicates_turn_true_on_their_day(
    hp: tuple[Harness, RedisServer, ManualClock],
) -> None:
    h, server, clock = hp
    now = clock.now_ms()
    for s in ("1", "2", "shop"):
        await crowd(h, s, "loyal30", predicate=admin_pb2.CrowdPredicate(min_follow_days=30))
        await crowd(h, s, "vip", list=admin_pb2.CrowdList())
    await crowds_visible(h, 6)
    last = 0
    items = []
    for s in ("1", "2", "shop"):
        for j, (kind, cid, amount) in enumerate(
            [(common_pb2.CROWD_KIND_ALL_FANS, "", 900), (0, "loyal30", 800), (0, "vip", 700),
             (common_pb2.CROWD_KIND_PURCHASED_FANS, "", 850)]
        ):  # fmt: skip
            item = f"{s}-{j}"
            items.append(item)
            r = await h.admin.UpsertDiscountRule(
                admin_pb2.UpsertDiscountRuleRequest(
                    rule=admin_pb2.DiscountRule(
                        seller_id=s,
                        item_id=item,
                        crowd=kind,  # type: ignore[arg-type]
                        crowd_id=cid,
                        price=money(amount),
                    )
                ),
                metadata=ADMIN,
            )
            last = r.rule.revision
    await h.wait_index(last)
    # the buyer followed seller 1 a minute short of 30 days ago; is on shop's list
    await h.members.apply(
        derive.snapshot_row("b", "1", now - 30 * DAY + 60_000, 0, now - 1000, TTLS)
        + derive.follow("b", "2", now - 5000, TTLS)
    )
    assert h.server.crowds is not None
    vip = h.server.crowds.by_key[("shop", "vip")]
    await h.members.apply([derive.list_change("b", vip.list_handle, now, removed=False, ttls=TTLS)])
    await h.redis.set(h.members.layout.layout_version_key, LAYOUT_VERSION)
    assert h.server.core is not None
    await h.server.core.membership.check_layout_marker()
    client = aioredis.Redis.from_url(server.url)
    try:
        before = await hmgets(client)
        r = await h.batch("b", *[(i, 1000) for i in items])
        assert await hmgets(client) == before + 1  # one HMGET for the whole page
        prices = {p.item_id: p.price.amount_minor for p in r.prices}
        assert prices == {
            "1-0": 900, "1-1": 1000, "1-2": 1000, "1-3": 1000,  # a fan, not yet 30 days
            "2-0": 900, "2-1": 1000, "2-2": 1000, "2-3": 1000,
            "shop-0": 1000, "shop-1": 1000, "shop-2": 700, "shop-3": 1000,  # only on the list
        }  # fmt: skip
        clock.advance(61_000)  # the 30th day (a start is kept to the second, rounded up)
        r = await h.batch("b", ("1-1", 1000))
        assert r.prices[0].price.amount_minor == 800 and r.prices[0].crowd_id == "loyal30"
    finally:
        await client.aclose()


async def test_strict_reads_seller_crowds_from_the_store_and_new_crowds_apply_at_once(
    h: Harness,
) -> None:
    now = SystemClock().now_ms()
    for u in ("a", "b", "c"):
        await h.members.apply(derive.snapshot_row(u, "42", now - 50 * DAY, 3, now - 1000, TTLS))
    await h.fresh_watermark()
    # created and targeted just now: the strict path reads both from the store at once
    await crowd(
        h, "42", "big", predicate=admin_pb2.CrowdPredicate(min_follow_days=40, min_purchases=3)
    )
    await rule(h, "42", "x", "big", 500)
    for u in ("a", "b", "c"):  # every buyer of the relation is in it, no backfill
        s = await h.strict(u, "x", expected=500)
        assert s.verdict == pricing_pb2.VERDICT_ELIGIBLE and s.crowd_id == "big", u
    s = await h.strict("stranger", "x")
    assert s.verdict == pricing_pb2.VERDICT_NOT_IN_CROWD
    # the page path sees it after the index's refresh, with the reason for those outside
    await asyncio.sleep(0.3)
    r = await h.batch("a", ("x", 1000))
    assert r.prices[0].price.amount_minor == 500
    r = await h.batch("stranger", ("x", 1000), explain=True)
    assert [e.reason for e in r.prices[0].evaluations] == ["not following the seller"]
