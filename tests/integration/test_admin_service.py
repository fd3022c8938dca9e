"""DiscountAdminService through a real gRPC server, the real interceptor and a real store.

Every refusal is checked for its status code, its ErrorInfo reason and its BadRequest field:
authentication (missing, malformed, wrong, rotated, disabled), validation, business
preconditions, paging. No refusal may surface as INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from pricing_service.auth import fingerprint
from pricing_service.domain import ManualClock
from pricing_service.metrics import Metrics
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_service.runtime import RuntimeServer
from pricing_service.servicers.admin import DiscountAdminServicer
from pricing_testing.rule_stores import BACKENDS, pg_schema, settings_for, sqlite_url
from tests.support.serve import serve
from tests.support.status import status_details

pytestmark = pytest.mark.integration

TOKEN = "admin-token-new"
OLD_TOKEN = "admin-token-old"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ALL, OLD, BOUGHT = (
    common_pb2.CROWD_KIND_ALL_FANS,
    common_pb2.CROWD_KIND_OLD_FANS,
    common_pb2.CROWD_KIND_PURCHASED_FANS,
)


@dataclass
class Admin:
    stub: admin_pb2_grpc.DiscountAdminServiceStub
    store: SqlRuleStore
    metrics: Metrics


def money(amount: int, currency: str = "CNY") -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, amount_minor=amount)


def drule(
    item: str = "1001",
    crowd: Any = ALL,
    amount: int = 1888,
    *,
    seller: str = "42",
    currency: str = "CNY",
    rule_id: str = "",
) -> admin_pb2.DiscountRule:
    return admin_pb2.DiscountRule(
        rule_id=rule_id, seller_id=seller, item_id=item, crowd=crowd, price=money(amount, currency)
    )


async def start(url: str, tmp: Path, **overrides: object) -> tuple[RuntimeServer, Admin, Any]:
    """The admin servicer on the test's server runtime (``PRICING_SERVER_RUNTIME``)."""
    settings = settings_for(url, listen="127.0.0.1:0", **overrides)
    store = await open_rule_store(settings)
    metrics = Metrics()
    servicer = DiscountAdminServicer(store, settings, ManualClock())
    server = await serve(
        settings,
        metrics,
        lambda methods: admin_pb2_grpc.add_DiscountAdminServiceServicer_to_server(
            servicer, methods
        ),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return server, Admin(admin_pb2_grpc.DiscountAdminServiceStub(channel), store, metrics), channel


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_schema(request.getfixturevalue("pg_url")) as url:
            yield url


@pytest.fixture
async def admin(tmp_path: Path, server_runtime: str) -> AsyncIterator[Admin]:
    server, a, channel = await start(
        sqlite_url(tmp_path), tmp_path, admin_token=f"{OLD_TOKEN},{TOKEN}", max_rule_batch=500
    )
    yield a
    await channel.close()
    await server.stop(None)
    await a.store.close()


def details(err: grpc.aio.AioRpcError) -> tuple[str, list[tuple[str, str]]]:
    return status_details(err)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() != grpc.StatusCode.INTERNAL, info.value.details()
    return info.value


def upsert(a: Admin, rule: admin_pb2.DiscountRule, md: Any = AUTH) -> Any:
    return a.stub.UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(rule=rule), metadata=md, timeout=5
    )


# --- happy paths --------------------------------------------------------------------------


async def test_rule_lifecycle_over_grpc(store_url: str, tmp_path: Path) -> None:
    server, a, channel = await start(store_url, tmp_path, admin_token=TOKEN)
    try:
        r = drule(amount=1888)
        r.start_time.FromMilliseconds(1_800_000_000_000)
        r.end_time.FromMilliseconds(1_900_000_000_000)
        first = await upsert(a, r)
        assert first.changed and first.rule.rule_id and first.rule.revision == 1
        assert first.rule.start_time.ToMilliseconds() == 1_800_000_000_000
        assert first.rule.end_time.ToMilliseconds() == 1_900_000_000_000
        assert first.rule.create_time.ToMilliseconds() > 0
        again = await upsert(a, r)
        assert not again.changed and again.rule == first.rule  # idempotent: no new revision

        got = await a.stub.GetDiscountRule(
            admin_pb2.GetDiscountRuleRequest(rule_id=first.rule.rule_id), metadata=AUTH
        )
        assert got.rule == first.rule
        listed = await a.stub.ListDiscountRules(
            admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=AUTH
        )
        assert [x.rule_id for x in listed.rules] == [first.rule.rule_id]
        deleted = await a.stub.DeleteDiscountRule(
            admin_pb2.DeleteDiscountRuleRequest(rule_id=first.rule.rule_id), metadata=AUTH
        )
        assert deleted.revision == 2
        err = await refused(
            a.stub.GetDiscountRule(
                admin_pb2.GetDiscountRuleRequest(rule_id=first.rule.rule_id), metadata=AUTH
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert details(err)[0] == "RULE_NOT_FOUND"
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()


async def test_batch_sets_one_price_for_hundreds_of_items(admin: Admin) -> None:
    rules = [drule(f"sku-{n:03d}", OLD, 990) for n in range(400)]
    resp = await admin.stub.BatchUpsertDiscountRules(
        admin_pb2.BatchUpsertDiscountRulesRequest(rules=rules), metadata=AUTH, timeout=30
    )
    assert [r.item_id for r in resp.rules] == [f"sku-{n:03d}" for n in range(400)]
    assert {r.price.amount_minor for r in resp.rules} == {990}
    assert resp.rules[-1].revision == 400
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.stub.ListDiscountRules(
            admin_pb2.ListDiscountRulesRequest(seller_id="42", page_size=150, page_token=token),
            metadata=AUTH,
        )
        assert len(page.rules) <= 150
        seen += [r.item_id for r in page.rules]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"sku-{n:03d}" for n in range(400)]


async def test_history_names_the_actor(admin: Admin) -> None:
    await upsert(admin, drule(amount=2000), md=(*AUTH, ("x-actor", "alice")))
    old = (("authorization", f"Bearer {OLD_TOKEN}"),)
    await upsert(admin, drule(amount=1500), md=old)
    resp = await admin.stub.ListRuleHistory(
        admin_pb2.ListRuleHistoryRequest(seller_id="42", item_id="1001"), metadata=AUTH
    )
    assert [(c.revision, c.action, c.rule.price.amount_minor, c.actor) for c in resp.changes] == [
        (2, "UPSERT", 1500, fingerprint(OLD_TOKEN)),
        (1, "UPSERT", 2000, f"alice ({fingerprint(TOKEN)})"),
    ]
    assert all(TOKEN not in c.actor and OLD_TOKEN not in c.actor for c in resp.changes)
    assert resp.changes[0].change_time.ToMilliseconds() > 0


# --- authentication -------------------------------------------------------------------------

CALLS: list[tuple[str, Callable[[admin_pb2_grpc.DiscountAdminServiceStub, Any], Any]]] = [
    (
        "Upsert",
        lambda s, md: s.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=drule()), metadata=md
        ),
    ),
    (
        "Get",
        lambda s, md: s.GetDiscountRule(admin_pb2.GetDiscountRuleRequest(rule_id="x"), metadata=md),
    ),
    (
        "Delete",
        lambda s, md: s.DeleteDiscountRule(
            admin_pb2.DeleteDiscountRuleRequest(rule_id="x"), metadata=md
        ),
    ),
    (
        "List",
        lambda s, md: s.ListDiscountRules(
            admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=md
        ),
    ),
    (
        "Batch",
        lambda s, md: s.BatchUpsertDiscountRules(
            admin_pb2.BatchUpsertDiscountRulesRequest(rules=[drule()]), metadata=md
        ),
    ),
    (
        "History",
        lambda s, md: s.ListRuleHistory(
            admin_pb2.ListRuleHistoryRequest(seller_id="42"), metadata=md
        ),
    ),
]

BAD_CREDENTIALS = [
    ((), "MISSING_CREDENTIALS"),
    ((("authorization", ""),), "MISSING_CREDENTIALS"),
    ((("authorization", f"Basic {TOKEN}"),), "MISSING_CREDENTIALS"),
    ((("authorization", "Bearer"),), "MISSING_CREDENTIALS"),
    ((("authorization", "Bearer wrong-token"),), "INVALID_TOKEN"),
    ((("authorization", f"Bearer {TOKEN}x"),), "INVALID_TOKEN"),
    ((("authorization", f"Bearer {TOKEN[:-1]}"),), "INVALID_TOKEN"),
]


@pytest.mark.parametrize(("name", "call"), CALLS, ids=[c[0] for c in CALLS])
async def test_every_admin_call_requires_a_valid_token(
    admin: Admin, name: str, call: Callable[[admin_pb2_grpc.DiscountAdminServiceStub, Any], Any]
) -> None:
    for md, reason in BAD_CREDENTIALS:
        err = await refused(call(admin.stub, md))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
        assert details(err)[0] == reason, (name, md)
    assert await admin.store.current_revision() == 0  # nothing was written


async def test_both_rotated_tokens_are_accepted(admin: Admin) -> None:
    for token in (OLD_TOKEN, TOKEN):
        md = (("authorization", f"Bearer {token}"),)
        resp = await admin.stub.ListDiscountRules(
            admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=md
        )
        assert list(resp.rules) == []
        # case of the scheme does not matter (RFC 7235)
        md = (("authorization", f"bearer {token}"),)
        await admin.stub.ListDiscountRules(
            admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=md
        )


async def test_admin_is_disabled_without_a_configured_token(tmp_path: Path) -> None:
    server, a, channel = await start(sqlite_url(tmp_path), tmp_path, admin_token=None)
    try:
        for md in ((), AUTH):
            err = await refused(upsert(a, drule(), md=md))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert details(err)[0] == "ADMIN_DISABLED"
        assert await a.store.current_revision() == 0
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()


# --- validation -----------------------------------------------------------------------------


def _with(**changes: Any) -> admin_pb2.DiscountRule:
    r = drule()
    for key, value in changes.items():
        if key == "price":
            if value is None:
                r.ClearField("price")
            else:
                r.price.CopyFrom(value)
        elif key == "window":
            r.start_time.FromMilliseconds(value[0])
            r.end_time.FromMilliseconds(value[1])
        else:
            setattr(r, key, value)
    return r


INVALID = [
    ("empty seller", _with(seller_id=""), "rule.seller_id", "MISSING_ID"),
    ("empty item", _with(item_id=""), "rule.item_id", "MISSING_ID"),
    ("long item", _with(item_id="i" * 129), "rule.item_id", "ID_TOO_LONG"),
    ("control char", _with(item_id="a\nb"), "rule.item_id", "INVALID_ID"),
    ("long rule id", _with(rule_id="r" * 200), "rule.rule_id", "ID_TOO_LONG"),
    ("no crowd", _with(crowd=0), "rule.crowd", "CROWD_KIND_UNSPECIFIED"),
    ("unknown crowd", _with(crowd=9), "rule.crowd", "INVALID_CROWD"),
    ("no price", _with(price=None), "rule.price", "MISSING_FIELD"),
    ("zero", _with(price=money(0)), "rule.price.amount_minor", "ZERO_PRICE"),
    ("negative", _with(price=money(-5)), "rule.price.amount_minor", "NEGATIVE_PRICE"),
    ("huge", _with(price=money(10**15 + 1)), "rule.price.amount_minor", "PRICE_TOO_LARGE"),
    ("currency", _with(price=money(100, "XYZ")), "rule.price.currency_code", "UNKNOWN_CURRENCY"),
    ("lowercase", _with(price=money(100, "cny")), "rule.price.currency_code", "UNKNOWN_CURRENCY"),
    ("no currency", _with(price=money(100, "")), "rule.price.currency_code", "UNKNOWN_CURRENCY"),
    ("empty window", _with(window=(2000, 2000)), "rule.end_time", "EMPTY_VALIDITY_WINDOW"),
    ("inverted", _with(window=(3000, 2000)), "rule.end_time", "EMPTY_VALIDITY_WINDOW"),
]


@pytest.mark.parametrize(("case", "rule", "field", "reason"), INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_rules_are_refused_naming_the_field(
    admin: Admin, case: str, rule: admin_pb2.DiscountRule, field: str, reason: str
) -> None:
    err = await refused(upsert(admin, rule))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    got_reason, fields = details(err)
    assert got_reason == reason
    assert (field, reason) in fields
    # the same rule inside a batch is named by its position
    batch = [drule("ok-1"), drule("ok-2"), rule]
    err = await refused(
        admin.stub.BatchUpsertDiscountRules(
            admin_pb2.BatchUpsertDiscountRulesRequest(rules=batch), metadata=AUTH
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (field.replace("rule.", "rules[2].", 1), reason) in details(err)[1]
    assert await admin.store.current_revision() == 0


async def test_missing_rule_message_is_refused(admin: Admin) -> None:
    err = await refused(
        admin.stub.UpsertDiscountRule(admin_pb2.UpsertDiscountRuleRequest(), metadata=AUTH)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err) == ("MISSING_FIELD", [("rule", "MISSING_FIELD")])


async def test_several_bad_fields_are_all_reported(admin: Admin) -> None:
    err = await refused(upsert(admin, _with(seller_id="", crowd=0, price=money(0))))
    fields = dict(details(err)[1])
    assert fields == {
        "rule.seller_id": "MISSING_ID",
        "rule.crowd": "CROWD_KIND_UNSPECIFIED",
        "rule.price.amount_minor": "ZERO_PRICE",
    }


async def test_business_preconditions(admin: Admin) -> None:
    mine = (await upsert(admin, drule("1001", ALL))).rule
    other = (await upsert(admin, drule("2002", ALL))).rule

    err = await refused(upsert(admin, drule("1001", OLD, seller="7")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err) == (
        "ITEM_OWNED_BY_OTHER_SELLER",
        [("rule.item_id", "ITEM_OWNED_BY_OTHER_SELLER")],
    )
    err = await refused(upsert(admin, drule("1001", OLD, rule_id=other.rule_id)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err)[0] == "RULE_ID_CONFLICT"
    err = await refused(upsert(admin, drule("1001", ALL, 5, rule_id="another-id")))
    assert details(err) == ("RULE_ID_CONFLICT", [("rule.rule_id", "RULE_ID_CONFLICT")])
    # the rule's own id is fine
    same = await upsert(admin, drule("1001", ALL, 5, rule_id=mine.rule_id))
    assert same.changed and same.rule.rule_id == mine.rule_id

    batch = [drule("3003"), drule("1001", BOUGHT, seller="9")]
    err = await refused(
        admin.stub.BatchUpsertDiscountRules(
            admin_pb2.BatchUpsertDiscountRulesRequest(rules=batch), metadata=AUTH
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err)[1] == [("rules[1].item_id", "ITEM_OWNED_BY_OTHER_SELLER")]
    assert await admin.store.current_revision() == 3  # the batch wrote nothing


async def test_rules_per_item_limit_over_grpc(tmp_path: Path) -> None:
    server, a, channel = await start(
        sqlite_url(tmp_path), tmp_path, admin_token=TOKEN, max_rules_per_item=1
    )
    try:
        await upsert(a, drule("1001", ALL))
        err = await refused(upsert(a, drule("1001", OLD)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert details(err) == (
            "TOO_MANY_RULES_FOR_ITEM",
            [("rule.item_id", "TOO_MANY_RULES_FOR_ITEM")],
        )
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()


async def test_batch_bounds_and_duplicates(admin: Admin) -> None:
    async def batch(rules: list[admin_pb2.DiscountRule]) -> grpc.aio.AioRpcError:
        return await refused(
            admin.stub.BatchUpsertDiscountRules(
                admin_pb2.BatchUpsertDiscountRulesRequest(rules=rules), metadata=AUTH
            )
        )

    err = await batch([])
    assert details(err) == ("EMPTY_BATCH", [("rules", "EMPTY_BATCH")])
    err = await batch([drule(f"i{n}") for n in range(501)])
    assert details(err) == ("BATCH_TOO_LARGE", [("rules", "BATCH_TOO_LARGE")])
    err = await batch([drule("a"), drule("a", amount=5)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err) == ("DUPLICATE_RULE", [("rules[1]", "DUPLICATE_RULE")])
    assert await admin.store.current_revision() == 0


async def test_reads_and_deletes_refuse_bad_input(admin: Admin) -> None:
    s = admin.stub
    cases: list[tuple[Any, grpc.StatusCode, str, str]] = [
        (s.GetDiscountRule(admin_pb2.GetDiscountRuleRequest(), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "MISSING_ID", "rule_id"),
        (s.DeleteDiscountRule(admin_pb2.DeleteDiscountRuleRequest(), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "MISSING_ID", "rule_id"),
        (s.DeleteDiscountRule(admin_pb2.DeleteDiscountRuleRequest(rule_id="nope"), metadata=AUTH),
         grpc.StatusCode.NOT_FOUND, "RULE_NOT_FOUND", "rule_id"),
        (s.ListDiscountRules(admin_pb2.ListDiscountRulesRequest(), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FILTER", "seller_id"),
        (s.ListDiscountRules(admin_pb2.ListDiscountRulesRequest(seller_id="42", page_size=-1), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size"),
        (s.ListDiscountRules(admin_pb2.ListDiscountRulesRequest(seller_id="42", page_token="zz"), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token"),
        (s.ListDiscountRules(admin_pb2.ListDiscountRulesRequest(item_id="x" * 500), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "ID_TOO_LONG", "item_id"),
        (s.ListRuleHistory(admin_pb2.ListRuleHistoryRequest(), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "MISSING_ID", "seller_id"),
        (s.ListRuleHistory(admin_pb2.ListRuleHistoryRequest(seller_id="42", page_token="%%"), metadata=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token"),
    ]  # fmt: skip
    for call, code, reason, field in cases:
        err = await refused(call)
        assert err.code() == code, (reason, err.details())
        assert details(err) == (reason, [(field, reason)])
    requests = [
        x for m in admin.metrics.registry.collect() if m.name == "pricing_rpc_requests"
        for x in m.samples
    ]  # fmt: skip
    assert requests
    # INTERNAL series exist from the start at 0 (for alerting); none may have counted anything
    assert not [x for x in requests if x.labels.get("code") == "INTERNAL" and x.value]


async def test_page_size_is_coerced_to_the_maximum(admin: Admin) -> None:
    await admin.stub.BatchUpsertDiscountRules(
        admin_pb2.BatchUpsertDiscountRulesRequest(rules=[drule(f"i{n}") for n in range(3)]),
        metadata=AUTH,
    )
    resp = await admin.stub.ListDiscountRules(
        admin_pb2.ListDiscountRulesRequest(seller_id="42", page_size=1_000_000), metadata=AUTH
    )
    assert len(resp.rules) == 3 and resp.next_page_token == ""


async def test_pricing_reads_are_unaffected_by_admin_auth(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """The whole server: admin refusals do not touch PricingService, which needs no token."""
    from pricing.v1 import pricing_pb2, pricing_pb2_grpc  # noqa: PLC0415
    from pricing_service.config import load_settings  # noqa: PLC0415
    from pricing_service.server import PricingServer  # noqa: PLC0415

    settings = load_settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        rule_store_url=sqlite_url(tmp_path),
        listen="127.0.0.1:0",
        metrics_port=0,
        admin_token=TOKEN,
        rule_refresh_interval_ms=50,
    )
    async with (
        PricingServer(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        admin = admin_pb2_grpc.DiscountAdminServiceStub(channel)
        pricing = pricing_pb2_grpc.PricingServiceStub(channel)
        written = await admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=drule("1001", ALL, 1888)),
            metadata=AUTH,
            timeout=5,
        )
        for md, _ in BAD_CREDENTIALS:
            err = await refused(
                admin.ListDiscountRules(
                    admin_pb2.ListDiscountRulesRequest(seller_id="42"), metadata=md, timeout=5
                )
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        request = pricing_pb2.BatchGetLowestPriceRequest(
            user_id="", items=[pricing_pb2.PriceQuery(item_id="1001", list_price=money(2500))]
        )
        deadline = asyncio.get_running_loop().time() + 5
        while True:  # no authorization metadata at all
            resp = await pricing.BatchGetLowestPrice(request, timeout=5)
            if resp.rule_revision >= written.rule.revision:
                break
            assert asyncio.get_running_loop().time() < deadline, "index never caught up"
            await asyncio.sleep(0.02)
        assert [p.price.amount_minor for p in resp.prices] == [2500]  # anonymous: list price
        assert not resp.degraded


def with_unknown_field(message: Any, number: int = 99) -> Any:
    """A copy of ``message`` carrying a varint field this server's schema does not have."""
    tag, raw = (number << 3) | 0, bytearray()
    while True:
        low, tag = tag & 0x7F, tag >> 7
        raw.append(low | (0x80 if tag else 0))
        if not tag:
            break
    return type(message).FromString(message.SerializeToString() + bytes(raw) + b"\x05")


async def test_unknown_fields_are_refused_not_dropped(admin: Admin) -> None:
    rule = with_unknown_field(drule())
    err = await refused(upsert(admin, rule))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err) == ("UNKNOWN_FIELD", [("rule", "UNKNOWN_FIELD")])
    nested = drule()
    nested.price.CopyFrom(with_unknown_field(money(100), 7))
    err = await refused(upsert(admin, nested))
    assert details(err) == ("UNKNOWN_FIELD", [("rule.price", "UNKNOWN_FIELD")])
    request = with_unknown_field(admin_pb2.UpsertDiscountRuleRequest(rule=drule()), 50)
    err = await refused(admin.stub.UpsertDiscountRule(request, metadata=AUTH))
    assert details(err) == ("UNKNOWN_FIELD", [("request", "UNKNOWN_FIELD")])
    err = await refused(
        admin.stub.BatchUpsertDiscountRules(
            admin_pb2.BatchUpsertDiscountRulesRequest(rules=[drule("a"), rule]), metadata=AUTH
        )
    )
    assert details(err) == ("UNKNOWN_FIELD", [("rules[1]", "UNKNOWN_FIELD")])
    assert await admin.store.current_revision() == 0
