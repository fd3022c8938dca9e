"""The serving benchmark's data and answers: what is written to the stores, the page asked for,
and the exact answer the pure engine gives for it (``bench.serving`` checks the server's against
it before and after the load: a fast wrong answer is no result).

1. A private ``redis-server`` and a SQLite rule store get realistic data: 100 sellers x 20
   items, 3 crowd rules per item (some ended or not yet started), 2,000 buyers with
   memberships, and the benchmark buyer, who follows 6 of the 10 sellers of the page (3 as an
   old fan, 2 as a purchaser). The page is ``--batch`` items spread over 10 sellers.
2. The request is the length-prefixed protobuf h2load posts.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from typing import Any

NAMESPACE = "bench:"
SELLERS = 100
ITEMS_PER_SELLER = 20
PAGE_SELLERS = 10
OTHER_BUYERS = 2000
BUYER = "u-bench-0001"
CURRENCY = "CNY"
METHOD = "/pricing.v1.PricingService/BatchGetLowestPrice"


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Catalog:
    """What was written to the stores, enough to predict every answer."""

    sellers: list[str]
    items: dict[str, list[str]]  # seller -> item ids
    list_price: dict[str, int]  # item -> list price (minor units)
    page_sellers: list[str]


def catalog(seed: int = 42) -> Catalog:
    rnd = random.Random(seed)
    sellers = [str(1001 + s) for s in range(SELLERS)]
    items = {s: [f"{s}{j:04d}" for j in range(ITEMS_PER_SELLER)] for s in sellers}
    list_price = {i: rnd.randrange(2_000, 50_000, 100) for s in sellers for i in items[s]}
    return Catalog(sellers, items, list_price, rnd.sample(sellers, PAGE_SELLERS))


def page(cat: Catalog, batch: int) -> list[tuple[str, int]]:
    """``batch`` (item, list price) pairs, round-robin over the page's 10 sellers."""
    if batch > PAGE_SELLERS * ITEMS_PER_SELLER:
        raise SystemExit(f"--batch at most {PAGE_SELLERS * ITEMS_PER_SELLER}")
    out = []
    for k in range(batch):
        seller = cat.page_sellers[k % PAGE_SELLERS]
        item = cat.items[seller][k // PAGE_SELLERS]
        out.append((item, cat.list_price[item]))
    return out


async def load_data(settings: Any, cat: Catalog, seed: int = 7, crowds: str = "builtin") -> None:
    """Rules into the store (SQLite), memberships into the private Redis (``crowds``: the
    page's crowd mix, ``bench.crowd_mix``)."""
    from bench import crowd_mix  # noqa: PLC0415
    from pricing_service.domain import CrowdKind, Money, Rule, SystemClock  # noqa: PLC0415
    from pricing_service.membership import derive  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.factory import open_rule_store  # noqa: PLC0415
    from sync_worker.lists import migrate_membership  # noqa: PLC0415

    rnd = random.Random(seed)
    clock = SystemClock()
    now = clock.now_ms()
    day = derive.DAY_MS
    rules: list[Rule] = []
    for s in cat.sellers:
        for item in cat.items[s]:
            lp = cat.list_price[item]
            for kind, off in (
                (CrowdKind.ALL_FANS, 5),
                (CrowdKind.OLD_FANS, 10),
                (CrowdKind.PURCHASED_FANS, 15),
            ):
                start = end = None
                roll = rnd.random()
                if roll < 0.05:
                    end = now - day  # ended yesterday
                elif roll < 0.10:
                    start = now + day  # starts tomorrow
                elif roll < 0.30:
                    start, end = now - day, now + 30 * day
                pct = off + rnd.randrange(0, 10)
                if rnd.random() < 0.05:
                    pct = -5  # above the list price: never applied
                price = lp * (100 - pct) // 100
                kind, crowd_id = crowd_mix.target(kind, crowds)  # noqa: PLW2901
                rules.append(Rule("", s, item, kind, Money(CURRENCY, price), start, end,
                                  crowd_id=crowd_id))  # fmt: skip
    store = await open_rule_store(settings)
    try:
        await crowd_mix.define(store, cat.sellers, crowds)
        for i in range(0, len(rules), 1000):
            await store.upsert_many(rules[i : i + 1000], "bench")
    finally:
        await store.close()

    redis = make_redis(settings)
    try:
        membership = MembershipStore(redis, MembershipLayout(settings.redis_namespace), clock)
        ttls = derive.Ttls.from_seconds(
            settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
        )
        cut = now - 3_600_000
        writes: list[derive.MembershipWrite] = []
        for b in range(OTHER_BUYERS):
            for s in rnd.sample(cat.sellers, 15):
                followed = cut - rnd.randrange(1, 400) * day
                writes += derive.snapshot_row(
                    f"u{b:06d}", s, followed, rnd.choice((0, 0, 1, 3)), cut, ttls
                )
        # the benchmark buyer: 6 of the page's 10 sellers, plus 20 sellers off the page
        page_s = cat.page_sellers
        others = [s for s in cat.sellers if s not in page_s]
        for k, s in enumerate(page_s[:6]):
            followed = cut - (90 if k < 3 else 5) * day
            writes += derive.snapshot_row(BUYER, s, followed, 1 if k in (0, 4) else 0, cut, ttls)
        for s in rnd.sample(others, 20):
            writes += derive.snapshot_row(BUYER, s, cut - 200 * day, 1, cut, ttls)
        for i in range(0, len(writes), 5000):
            result = await membership.apply(writes[i : i + 5000])
            if result.failed_users:
                raise RuntimeError(f"membership writes failed: {result.failed_users}")
        store = await open_rule_store(settings)
        try:
            others = [f"u{b:06d}" for b in range(0, OTHER_BUYERS, 4)]
            await crowd_mix.members(store, membership, page_s, BUYER, others, ttls, crowds)
        finally:
            await store.close()
        await migrate_membership(settings, redis)  # a deployment past its migration
    finally:
        await redis.aclose()


async def expected_answer(
    settings: Any, items: list[tuple[str, int]]
) -> list[tuple[str, int, str]]:
    """(item, price, rule id or '') per item, from the stores and the pure engine."""
    from pricing_service.domain import Money, SystemClock  # noqa: PLC0415
    from pricing_service.engine import crowds_to_check, decide  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.factory import open_rule_store  # noqa: PLC0415

    clock = SystemClock()
    now = clock.now_ms()
    store = await open_rule_store(settings)
    try:
        read = [await store.rules_with_crowds(item) for item, _ in items]
    finally:
        await store.close()
    rule_lists = [rules for rules, _, _ in read]
    defs = {k: d for _, ds, _ in read for k, d in ds.items()}
    redis = make_redis(settings)
    try:
        membership = MembershipStore(redis, MembershipLayout(settings.redis_namespace), clock)
        members = await membership.member_crowds(
            BUYER, crowds_to_check(rule_lists, now), resolve=defs
        )
    finally:
        await redis.aclose()
    out = []
    for (item, lp), rules in zip(items, rule_lists, strict=True):
        d = decide(Money(CURRENCY, lp), rules, members, now)
        assert d.price is not None
        out.append((item, d.price.amount_minor, d.rule.rule_id if d.rule else ""))
    return out


async def page_fields(settings: Any, items: list[tuple[str, int]]) -> tuple[str, list[str]]:
    """The buyer's hash and the fields the server's one HMGET reads for this page (the floor's
    read), as the membership store derives them."""
    from pricing_service.domain import SystemClock  # noqa: PLC0415
    from pricing_service.engine import crowd_keys_to_check  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.factory import open_rule_store  # noqa: PLC0415

    store = await open_rule_store(settings)
    try:
        read = [await store.rules_with_crowds(item) for item, _ in items]
    finally:
        await store.close()
    rule_lists = [rules for rules, _, _ in read]
    defs = {k: d for _, ds, _ in read for k, d in ds.items()}
    clock = SystemClock()
    redis = make_redis(settings)  # not connected: only the layout is used
    try:
        membership = MembershipStore(
            redis, MembershipLayout(settings.redis_namespace), clock, legacy_reads=False
        )
        _, fields = membership.lookup_fields(
            crowd_keys_to_check(rule_lists, clock.now_ms()), resolve=defs
        )
        return membership.layout.user_key(BUYER), [f.decode() for f in fields]
    finally:
        await redis.aclose()


def request_bytes(items: list[tuple[str, int]]) -> bytes:
    from pricing.v1 import common_pb2, pricing_pb2  # noqa: PLC0415

    req = pricing_pb2.BatchGetLowestPriceRequest(
        user_id=BUYER,
        items=[
            pricing_pb2.PriceQuery(
                item_id=i, list_price=common_pb2.Money(currency_code=CURRENCY, amount_minor=lp)
            )
            for i, lp in items
        ],
    )
    data: bytes = req.SerializeToString()
    return data


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def call_once(target: str, request: bytes, timeout_s: float = 20.0) -> bytes:
    """One real BatchGetLowestPrice (waits for the server to come up); the raw response."""
    import grpc  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        while True:
            try:
                data: bytes = rpc(request, timeout=2, wait_for_ready=True)
                return data
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class DegradedAnswer(AssertionError):
    """The server answered list prices: it could not read membership in time."""


def check_answer(response: bytes, expected: list[tuple[str, int, str]]) -> int:
    """Raise unless the response equals the expected answer; return the discounted count."""
    from pricing.v1 import pricing_pb2  # noqa: PLC0415

    r = pricing_pb2.BatchGetLowestPriceResponse.FromString(response)
    if r.degraded:
        raise DegradedAnswer("the server answered degraded: membership was not read")
    got = [(p.item_id, p.price.amount_minor, p.rule_id) for p in r.prices]
    if got != expected:
        raise AssertionError(f"wrong answer:\n got {got}\nwant {expected}")
    discounted = sum(1 for p in r.prices if p.discounted)
    if not 0 < discounted < len(expected):
        raise AssertionError(f"{discounted} of {len(expected)} discounted: not a realistic page")
    return discounted


def verified_call(
    target: str, request: bytes, expected: list[tuple[str, int, str]], attempts: int = 10
) -> bytes:
    """A real call whose answer must be exactly ``expected``.

    A degraded answer (membership budget missed: a cold connection, a loaded machine) is retried
    a few times, as the server's breaker would; a wrong answer fails at once.
    """
    for attempt in range(attempts):
        response = call_once(target, request)
        try:
            check_answer(response, expected)
            return response
        except DegradedAnswer:
            if attempt == attempts - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")
