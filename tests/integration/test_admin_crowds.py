"""Crowds in DiscountAdminService through a real gRPC server, interceptor, rule store and Redis.

A seller defines predicate and list crowds, targets rules at them, adds and removes list
members, reads the audit trail; every hostile definition or upload (negative or absurd
thresholds, contradictory ones, reserved or malformed ids, duplicates, oversize batches, a
10^6-member request, unknown crowds and buyers) is refused with its status, reason and field,
and nothing is written: no crowd row, no audit entry, no Redis key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from pricing_service.domain import CrowdKey, CrowdKind, ManualClock
from pricing_service.interceptors import ServerInterceptor
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.metrics import Metrics
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_service.servicers.admin import DiscountAdminServicer
from pricing_testing.rule_stores import BACKENDS, pg_schema, settings_for, sqlite_url
from tests.support.status import status_details

pytestmark = pytest.mark.integration

TOKEN = "crowd-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"), ("x-actor", "seller-42-backend"))


@dataclass
class Admin:
    stub: admin_pb2_grpc.DiscountAdminServiceStub
    store: SqlRuleStore
    membership: MembershipStore
    redis: aioredis.Redis
    namespace: str


async def start(
    url: str, redis_url: str, namespace: str, **overrides: object
) -> tuple[grpc.aio.Server, Admin, grpc.aio.Channel]:
    settings = settings_for(url, admin_token=TOKEN, redis_namespace=namespace, **overrides)
    store = await open_rule_store(settings)
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    membership = MembershipStore(client, MembershipLayout(namespace), ManualClock())
    server = grpc.aio.server(
        interceptors=[ServerInterceptor(Metrics(), max_concurrent_rpcs=100)],
        options=[("grpc.max_receive_message_length", settings.max_message_bytes)],
    )
    admin_pb2_grpc.add_DiscountAdminServiceServicer_to_server(
        DiscountAdminServicer(store, settings, membership.clock, membership), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    stub = admin_pb2_grpc.DiscountAdminServiceStub(channel)
    return server, Admin(stub, store, membership, client, namespace), channel


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_schema(request.getfixturevalue("pg_url")) as url:
            yield url


@pytest.fixture
async def admin(tmp_path: Path, redis_url: str, namespace: str) -> AsyncIterator[Admin]:
    server, a, channel = await start(sqlite_url(tmp_path), redis_url, namespace)
    yield a
    await channel.close()
    await server.stop(None)
    await a.store.close()
    await a.redis.aclose()


def predicate(**conds: int) -> admin_pb2.CrowdPredicate:
    return admin_pb2.CrowdPredicate(**conds)


def crowd(crowd_id: str = "loyal30", seller: str = "42", **form: Any) -> admin_pb2.Crowd:
    if not form:
        form = {"predicate": predicate(min_follow_days=30)}
    return admin_pb2.Crowd(seller_id=seller, crowd_id=crowd_id, **form)


async def create(a: Admin, c: admin_pb2.Crowd) -> admin_pb2.Crowd:
    r = await a.stub.CreateCrowd(admin_pb2.CreateCrowdRequest(crowd=c), metadata=AUTH, timeout=5)
    return r.crowd


async def refused(a: Admin, call: Any, code: grpc.StatusCode) -> tuple[str, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return status_details(info.value)


async def nothing_written(a: Admin, *, crowds: int, changes: int) -> None:
    listed = await a.stub.ListCrowds(admin_pb2.ListCrowdsRequest(seller_id="42"), metadata=AUTH)
    assert len(listed.crowds) == crowds
    history = await a.stub.ListCrowdHistory(
        admin_pb2.ListCrowdHistoryRequest(seller_id="42"), metadata=AUTH
    )
    assert len(history.changes) == changes
    keys = [k async for k in a.redis.scan_iter(match=f"{a.namespace}cm:*")]
    assert keys == [], keys


def rule(item: str, crowd_id: str, amount: int = 900, seller: str = "42") -> admin_pb2.DiscountRule:
    return admin_pb2.DiscountRule(
        seller_id=seller,
        item_id=item,
        crowd_id=crowd_id,
        price=common_pb2.Money(currency_code="CNY", amount_minor=amount),
    )


# --- happy paths --------------------------------------------------------------------------------
async def test_crowd_lifecycle_with_rules_and_audit(
    store_url: str, redis_url: str, namespace: str
) -> None:
    server, a, channel = await start(store_url, redis_url, namespace)
    try:
        made = await create(
            a, crowd(display_name="Fans of a month", predicate=predicate(min_follow_days=30))
        )
        assert made.name == "sellers/42/crowds/loyal30" and made.revision == 1
        assert made.predicate.min_follow_days == 30
        assert not made.predicate.HasField("max_follow_days")  # unset stays unset
        got = await a.stub.GetCrowd(
            admin_pb2.GetCrowdRequest(seller_id="42", crowd_id="loyal30"), metadata=AUTH
        )
        assert got.crowd == made
        for i in range(3):
            await create(a, crowd(f"c{i}", predicate=predicate(min_purchases=i + 1)))
        page = await a.stub.ListCrowds(
            admin_pb2.ListCrowdsRequest(seller_id="42", page_size=2), metadata=AUTH
        )
        rest = await a.stub.ListCrowds(
            admin_pb2.ListCrowdsRequest(seller_id="42", page_token=page.next_page_token),
            metadata=AUTH,
        )
        ids = [c.crowd_id for c in [*page.crowds, *rest.crowds]]
        assert ids == ["c0", "c1", "c2", "loyal30"] and not rest.next_page_token

        up = await a.stub.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=rule("1001", "loyal30")), metadata=AUTH
        )
        assert up.rule.crowd == common_pb2.CROWD_KIND_SELLER_DEFINED
        assert up.rule.crowd_id == "loyal30"
        # a built-in crowd's name as crowd_id means that built-in crowd
        builtin = await a.stub.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=rule("1001", "old_fans", 950)), metadata=AUTH
        )
        assert builtin.rule.crowd == common_pb2.CROWD_KIND_OLD_FANS and not builtin.rule.crowd_id
        # one rule per (item, crowd): the same crowd again replaces the price
        again = await a.stub.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(rule=rule("1001", "loyal30", 880)), metadata=AUTH
        )
        assert again.rule.rule_id == up.rule.rule_id and again.rule.price.amount_minor == 880

        _, violations = await refused(
            a,
            a.stub.DeleteCrowd(
                admin_pb2.DeleteCrowdRequest(seller_id="42", crowd_id="loyal30"), metadata=AUTH
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert violations == [("crowd_id", "CROWD_IN_USE")]
        await a.stub.DeleteDiscountRule(
            admin_pb2.DeleteDiscountRuleRequest(rule_id=up.rule.rule_id), metadata=AUTH
        )
        deleted = await a.stub.DeleteCrowd(
            admin_pb2.DeleteCrowdRequest(seller_id="42", crowd_id="loyal30"), metadata=AUTH
        )
        assert deleted.revision == 5
        await refused(
            a,
            a.stub.GetCrowd(
                admin_pb2.GetCrowdRequest(seller_id="42", crowd_id="loyal30"), metadata=AUTH
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        history = await a.stub.ListCrowdHistory(
            admin_pb2.ListCrowdHistoryRequest(seller_id="42"), metadata=AUTH
        )
        assert [(c.action, c.crowd.crowd_id) for c in history.changes] == [
            ("DELETE", "loyal30"), ("CREATE", "c2"), ("CREATE", "c1"), ("CREATE", "c0"),
            ("CREATE", "loyal30"),
        ]  # fmt: skip
        assert {c.actor.split(" ")[0] for c in history.changes} == {"seller-42-backend"}
        # the same id can be created again: a new crowd
        assert (await create(a, crowd(predicate=predicate(max_follow_days=7)))).revision == 6
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()
        await a.redis.aclose()


async def test_list_members_are_versioned_in_redis_and_audited(admin: Admin) -> None:
    a = admin
    made = await create(a, crowd("vip", list=admin_pb2.CrowdList()))
    assert made.HasField("list")
    handle = await a.membership.list_handle("42", "vip")
    assert handle is not None and handle >= 1  # registered for the list file loader
    r = await a.stub.BatchUpdateCrowdMembers(
        admin_pb2.BatchUpdateCrowdMembersRequest(
            seller_id="42", crowd_id="vip", add_user_ids=["alice", "bob", "never-seen"]
        ),
        metadata=AUTH,
    )
    assert (r.added, r.removed) == (3, 0) and r.change_time.ToMilliseconds() > 0
    vip = await a.store.get_crowd("42", "vip")
    key: CrowdKey = ("42", "vip")
    resolve = {key: vip}
    assert await a.membership.member_keys("alice", [key], resolve=resolve) == {key}
    a.membership.clock.advance(1)  # type: ignore[attr-defined]  # the next call is newer
    r = await a.stub.BatchUpdateCrowdMembers(
        admin_pb2.BatchUpdateCrowdMembersRequest(
            seller_id="42", crowd_id="vip", remove_user_ids=["alice"]
        ),
        metadata=AUTH,
    )
    assert (r.added, r.removed) == (0, 1)
    assert await a.membership.member_keys("alice", [key], resolve=resolve) == frozenset()
    assert await a.membership.member_keys("bob", [key], resolve=resolve) == {key}
    history = await a.stub.ListCrowdHistory(
        admin_pb2.ListCrowdHistoryRequest(seller_id="42"), metadata=AUTH
    )
    assert [(c.action, c.added, c.removed) for c in history.changes] == [
        ("MEMBERS", 0, 1), ("MEMBERS", 3, 0), ("CREATE", 0, 0)
    ]  # fmt: skip
    await a.stub.DeleteCrowd(
        admin_pb2.DeleteCrowdRequest(seller_id="42", crowd_id="vip"), metadata=AUTH
    )
    assert await a.membership.list_handle("42", "vip") is None
    # a crowd created again under the id never sees the old list (a new handle)
    await create(a, crowd("vip", list=admin_pb2.CrowdList()))
    again = await a.store.get_crowd("42", "vip")
    assert again.list_handle != vip.list_handle
    assert await a.membership.member_keys("bob", [key], resolve={key: again}) == frozenset()


# --- hostile definitions ------------------------------------------------------------------------
BAD_CROWDS = [
    (crowd(predicate=predicate(min_follow_days=-1)), "crowd.predicate.min_follow_days",
     "NEGATIVE_THRESHOLD"),
    (crowd(predicate=predicate(min_follow_days=10**6)), "crowd.predicate.min_follow_days",
     "THRESHOLD_TOO_LARGE"),
    (crowd(predicate=predicate(min_purchases=-3)), "crowd.predicate.min_purchases",
     "NEGATIVE_THRESHOLD"),
    (crowd(predicate=predicate(min_purchases=2**31 - 1)), "crowd.predicate.min_purchases",
     "THRESHOLD_TOO_LARGE"),
    (crowd(predicate=predicate(purchased_within_days=0)), "crowd.predicate.purchased_within_days",
     "THRESHOLD_TOO_SMALL"),
    (crowd(predicate=predicate(max_follow_days=0)), "crowd.predicate.max_follow_days",
     "THRESHOLD_TOO_SMALL"),
    (crowd(predicate=predicate(min_follow_days=30, max_follow_days=7)),
     "crowd.predicate.max_follow_days", "EMPTY_CROWD"),
    (crowd("all_fans"), "crowd.crowd_id", "RESERVED_CROWD_ID"),
    (crowd("VIP Crowd"), "crowd.crowd_id", "INVALID_CROWD_ID"),
    (crowd(""), "crowd.crowd_id", "INVALID_CROWD_ID"),
    (crowd("x" * 64), "crowd.crowd_id", "INVALID_CROWD_ID"),
    (crowd(seller=""), "crowd.seller_id", "MISSING_ID"),
    (admin_pb2.Crowd(seller_id="42", crowd_id="empty"), "crowd.predicate", "MISSING_DEFINITION"),
    (crowd(display_name="a\x00b"), "crowd.display_name", "INVALID_NAME"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "field", "reason"), BAD_CROWDS)
async def test_hostile_definitions_are_refused_and_nothing_is_written(
    admin: Admin, bad: admin_pb2.Crowd, field: str, reason: str
) -> None:
    got_reason, violations = await refused(
        admin,
        admin.stub.CreateCrowd(admin_pb2.CreateCrowdRequest(crowd=bad), metadata=AUTH),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert got_reason == reason
    assert (field, reason) in violations
    await nothing_written(admin, crowds=0, changes=0)


async def test_state_refusals_duplicate_id_limit_unknown_crowd_and_other_sellers_crowd(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    server, a, channel = await start(
        sqlite_url(tmp_path), redis_url, namespace, max_crowds_per_seller=2
    )
    try:
        await create(a, crowd("a"))
        reason, _ = await refused(
            a, a.stub.CreateCrowd(admin_pb2.CreateCrowdRequest(crowd=crowd("a")), metadata=AUTH),
            grpc.StatusCode.ALREADY_EXISTS,
        )  # fmt: skip
        assert reason == "CROWD_EXISTS"
        await create(a, crowd("b"))
        reason, _ = await refused(
            a, a.stub.CreateCrowd(admin_pb2.CreateCrowdRequest(crowd=crowd("c")), metadata=AUTH),
            grpc.StatusCode.FAILED_PRECONDITION,
        )  # fmt: skip
        assert reason == "TOO_MANY_CROWDS"
        for r, field, why in [
            (rule("1001", "nope"), "rule.crowd_id", "CROWD_NOT_FOUND"),
            (rule("2001", "a", seller="7"), "rule.crowd_id", "CROWD_NOT_FOUND"),  # 42's crowd
        ]:
            reason, violations = await refused(
                a,
                a.stub.UpsertDiscountRule(
                    admin_pb2.UpsertDiscountRuleRequest(rule=r), metadata=AUTH
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert (reason, violations) == (why, [(field, why)])
        mixed = rule("1001", "a")
        mixed.crowd = common_pb2.CROWD_KIND_OLD_FANS
        reason, violations = await refused(
            a,
            a.stub.UpsertDiscountRule(
                admin_pb2.UpsertDiscountRuleRequest(rule=mixed), metadata=AUTH
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert (reason, violations) == (
            "CONFLICTING_CROWD",
            [("rule.crowd_id", "CONFLICTING_CROWD")],
        )
        bare = rule("1001", "")
        bare.crowd = common_pb2.CROWD_KIND_SELLER_DEFINED
        reason, _ = await refused(
            a,
            a.stub.UpsertDiscountRule(
                admin_pb2.UpsertDiscountRuleRequest(rule=bare), metadata=AUTH
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert reason == "MISSING_CROWD_ID"
        assert await a.store.list_rules("42", "", 10, "") == ([], "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.stub.ListCrowds(admin_pb2.ListCrowdsRequest(seller_id="42"))  # no token
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()
        await a.redis.aclose()


# --- hostile uploads ------------------------------------------------------------------------------
def members(add: list[str] = [], remove: list[str] = [], crowd_id: str = "vip") -> Any:  # noqa: B006
    return admin_pb2.BatchUpdateCrowdMembersRequest(
        seller_id="42", crowd_id=crowd_id, add_user_ids=add, remove_user_ids=remove
    )


BAD_UPLOADS = [
    (members(), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_BATCH", ("add_user_ids", "EMPTY_BATCH")),
    (members([f"u{i}" for i in range(1001)]), grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE",
     ("add_user_ids", "BATCH_TOO_LARGE")),
    (members(["a", "b", "a"]), grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_USER",
     ("add_user_ids[2]", "DUPLICATE_USER")),
    (members(["a"], ["a"]), grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_USER",
     ("remove_user_ids[0]", "DUPLICATE_USER")),
    (members(["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_ID",
     ("add_user_ids[1]", "MISSING_ID")),
    (members(["ok", "x" * 200]), grpc.StatusCode.INVALID_ARGUMENT, "ID_TOO_LONG",
     ("add_user_ids[1]", "ID_TOO_LONG")),
    (members([], ["bad\nid"]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID",
     ("remove_user_ids[0]", "INVALID_ID")),
    (members(["a"], crowd_id="nope"), grpc.StatusCode.NOT_FOUND, "CROWD_NOT_FOUND",
     ("crowd_id", "CROWD_NOT_FOUND")),
    (members(["a"], crowd_id="loyal"), grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_LIST_CROWD",
     ("crowd_id", "NOT_A_LIST_CROWD")),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "code", "reason", "violation"), BAD_UPLOADS)
async def test_hostile_uploads_are_refused_and_nothing_is_written(
    admin: Admin,
    request_: admin_pb2.BatchUpdateCrowdMembersRequest,
    code: grpc.StatusCode,
    reason: str,
    violation: tuple[str, str],
) -> None:
    await create(admin, crowd("vip", list=admin_pb2.CrowdList()))
    await create(admin, crowd("loyal"))
    got, violations = await refused(
        admin, admin.stub.BatchUpdateCrowdMembers(request_, metadata=AUTH), code
    )
    assert got == reason
    assert violation in violations
    await nothing_written(admin, crowds=2, changes=2)


async def test_a_million_member_request_is_refused_whole(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """10^6 ids in one call: past the transport limit it is RESOURCE_EXHAUSTED before it is
    read; with the limit raised, BATCH_TOO_LARGE pointing at list files. Nothing is written."""
    million = [f"buyer-{i:07d}" for i in range(1_000_000)]
    for limit, code, reason in [
        (4 * 1024 * 1024, grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        (64 * 1024 * 1024, grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE"),
    ]:
        server, a, channel = await start(
            sqlite_url(tmp_path, f"rules-{limit}.db"), redis_url, namespace, max_message_bytes=limit
        )
        try:
            await create(a, crowd("vip", list=admin_pb2.CrowdList()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await a.stub.BatchUpdateCrowdMembers(members(million), metadata=AUTH, timeout=60)
            assert info.value.code() == code, info.value.details()
            if reason is not None:
                got, _ = status_details(info.value)
                assert got == reason and "sync-worker load-list" in (info.value.details() or "")
            await nothing_written(a, crowds=1, changes=1)
        finally:
            await channel.close()
            await server.stop(None)
            await a.store.close()
            await a.redis.aclose()


async def test_redis_down_during_a_member_update_is_unavailable_and_not_audited(
    tmp_path: Path, private_redis: Any
) -> None:
    server, a, channel = await start(sqlite_url(tmp_path), private_redis.url, "t:")
    try:
        await create(a, crowd("vip", list=admin_pb2.CrowdList()))
        private_redis.kill()
        reason, _ = await refused(
            a,
            a.stub.BatchUpdateCrowdMembers(members(["a"]), metadata=AUTH),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert reason == "REDIS_UNAVAILABLE"
        changes, _ = await a.store.crowd_history("42", 10, "")
        assert [c.action for c in changes] == ["CREATE"]
    finally:
        await channel.close()
        await server.stop(None)
        await a.store.close()
        await a.redis.aclose()


def test_seller_defined_is_a_crowd_kind_of_its_own() -> None:
    assert int(CrowdKind.SELLER_DEFINED) == common_pb2.CROWD_KIND_SELLER_DEFINED
