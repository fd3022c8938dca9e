"""The rule store contract, run unchanged against both backends.

A real SQLite file (WAL) and a real PostgreSQL server (a fresh schema per test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.domain import CrowdKind, ManualClock, Money, Rule
from pricing_service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_service.rules.migrations import LATEST_VERSION
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_testing.rule_stores import BACKENDS, pg_schema, settings_for, sqlite_url

pytestmark = pytest.mark.integration

ALL, OLD, BOUGHT = CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS


def rule(
    item: str,
    kind: CrowdKind = ALL,
    amount: int = 1888,
    *,
    seller: str = "42",
    rule_id: str = "",
    currency: str = "CNY",
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> Rule:
    return Rule(rule_id, seller, item, kind, Money(currency, amount), start_ms, end_ms)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_schema(request.getfixturevalue("pg_url")) as url:
            yield url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000_000)


@pytest.fixture
async def store(store_url: str, clock: ManualClock) -> AsyncIterator[SqlRuleStore]:
    s = await open_rule_store(settings_for(store_url), clock=clock)
    yield s
    await s.close()


# --- schema -------------------------------------------------------------------------------


async def test_migrations_are_versioned_idempotent_and_shared(
    store_url: str, store: SqlRuleStore
) -> None:
    assert await store.schema_version() == LATEST_VERSION
    assert await store.migrate() == []  # already applied at open
    other = await open_rule_store(settings_for(store_url))  # a second process/replica
    try:
        assert await other.migrate() == []
        assert await other.schema_version() == LATEST_VERSION
        r, _ = await store.upsert(rule("i1"), "a")
        assert await other.get(r.rule_id) == r  # one database, seen by both
    finally:
        await other.close()


async def test_replicas_starting_together_migrate_once(store_url: str) -> None:
    stores = await asyncio.gather(*(open_rule_store(settings_for(store_url)) for _ in range(4)))
    try:
        assert [await s.schema_version() for s in stores] == [LATEST_VERSION] * 4
        assert [await s.migrate() for s in stores] == [[]] * 4
        r, _ = await stores[0].upsert(rule("i1"), "a")
        assert r.revision == 1  # exactly one revision row was created
        assert [await s.current_revision() for s in stores] == [1] * 4
    finally:
        for s in stores:
            await s.close()


async def test_fresh_store_starts_at_revision_zero(store: SqlRuleStore) -> None:
    assert await store.current_revision() == 0
    assert await store.load_all() == ([], 0)
    assert await store.changes_since(0, 100) == []
    assert await store.rules_for_item("nope") == ([], 0)


# --- upsert ---------------------------------------------------------------------------------


async def test_upsert_creates_then_replaces_in_place(
    store: SqlRuleStore, clock: ManualClock
) -> None:
    created, changed = await store.upsert(rule("i1", amount=1999), "alice")
    assert changed
    assert created.rule_id and created.revision == 1
    assert created.create_ms == created.update_ms == clock.now_ms()
    assert await store.get(created.rule_id) == created

    clock.advance(5000)
    replaced, changed = await store.upsert(
        rule("i1", amount=1888, end_ms=clock.now_ms() + 1), "bob"
    )
    assert changed
    assert replaced.rule_id == created.rule_id  # same (item, crowd): same rule
    assert replaced.revision == 2
    assert replaced.price == Money("CNY", 1888)
    assert replaced.create_ms == created.create_ms
    assert replaced.update_ms == clock.now_ms()
    assert await store.get(created.rule_id) == replaced
    assert await store.current_revision() == 2


async def test_same_rule_twice_is_one_revision(store: SqlRuleStore) -> None:
    first, changed1 = await store.upsert(rule("i1"), "alice")
    again, changed2 = await store.upsert(rule("i1"), "alice")
    with_id, changed3 = await store.upsert(rule("i1", rule_id=first.rule_id), "bob")
    assert (changed1, changed2, changed3) == (True, False, False)
    assert again == first == with_id
    assert await store.current_revision() == 1
    assert [c.revision for c in await store.changes_since(0, 10)] == [1]


async def test_explicit_rule_id_is_kept(store: SqlRuleStore) -> None:
    r, _ = await store.upsert(rule("i1", rule_id="my-rule"), "a")
    assert r.rule_id == "my-rule"
    assert (await store.get("my-rule")).item_id == "i1"


async def test_rule_id_conflicts_are_refused(store: SqlRuleStore) -> None:
    a, _ = await store.upsert(rule("i1", ALL), "a")
    b, _ = await store.upsert(rule("i2", ALL), "a")
    # naming i2's rule while writing i1/OLD (a new (item, crowd)) is a conflict
    with pytest.raises(FailedPreconditionError) as e1:
        await store.upsert(rule("i1", OLD, rule_id=b.rule_id), "a")
    assert e1.value.reason == "RULE_ID_CONFLICT"
    assert e1.value.violations[0].field == "rule.rule_id"
    # (i1, ALL) already is rule a: another id for it is a conflict
    with pytest.raises(FailedPreconditionError) as e2:
        await store.upsert(rule("i1", ALL, 1000, rule_id="fresh-id"), "a")
    assert e2.value.reason == "RULE_ID_CONFLICT"
    assert await store.current_revision() == 2
    assert await store.get(a.rule_id) == a
    with pytest.raises(NotFoundError):
        await store.get("fresh-id")


async def test_item_belongs_to_one_seller(store: SqlRuleStore) -> None:
    await store.upsert(rule("i1", ALL, seller="42"), "a")
    for kind in (ALL, OLD):
        with pytest.raises(FailedPreconditionError) as err:
            await store.upsert(rule("i1", kind, seller="7"), "b")
        assert err.value.reason == "ITEM_OWNED_BY_OTHER_SELLER"
        assert err.value.violations[0].field == "rule.item_id"
    rules, revision = await store.rules_for_item("i1")
    assert [r.seller_id for r in rules] == ["42"]
    assert revision == 1


async def test_item_is_free_again_once_its_rules_are_deleted(store: SqlRuleStore) -> None:
    r, _ = await store.upsert(rule("i1", seller="42"), "a")
    await store.delete(r.rule_id, "a")
    other, changed = await store.upsert(rule("i1", seller="7"), "b")
    assert changed and other.seller_id == "7"


async def test_rules_per_item_are_bounded(store_url: str) -> None:
    s = await open_rule_store(settings_for(store_url, max_rules_per_item=2))
    try:
        await s.upsert(rule("i1", ALL), "a")
        await s.upsert(rule("i1", OLD), "a")
        with pytest.raises(FailedPreconditionError) as err:
            await s.upsert(rule("i1", BOUGHT), "a")
        assert err.value.reason == "TOO_MANY_RULES_FOR_ITEM"
        # replacing an existing one is still allowed at the limit
        _, changed = await s.upsert(rule("i1", OLD, 1000), "a")
        assert changed
        assert len((await s.rules_for_item("i1"))[0]) == 2
    finally:
        await s.close()


# --- delete ---------------------------------------------------------------------------------


async def test_delete(store: SqlRuleStore) -> None:
    r, _ = await store.upsert(rule("i1"), "alice")
    revision = await store.delete(r.rule_id, "bob")
    assert revision == 2
    with pytest.raises(NotFoundError) as err:
        await store.get(r.rule_id)
    assert err.value.reason == "RULE_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await store.delete(r.rule_id, "bob")  # twice: the second is unknown
    with pytest.raises(NotFoundError):
        await store.delete("never-existed", "bob")
    assert await store.current_revision() == 2
    change = (await store.changes_since(1, 10))[0]
    assert change.deleted and change.rule == r and change.actor == "bob"


# --- batch ----------------------------------------------------------------------------------


async def test_batch_sets_one_price_for_hundreds_of_items(store: SqlRuleStore) -> None:
    items = [f"item-{n:04d}" for n in range(300)]
    written = await store.upsert_many([rule(i, OLD, 990) for i in items], "seller-tool")
    assert [w.item_id for w in written] == items
    assert [w.revision for w in written] == list(range(1, 301))
    rules, revision = await store.load_all()
    assert revision == 300 and len(rules) == 300
    assert {r.price for r in rules} == {Money("CNY", 990)}
    # the same batch again changes nothing
    again = await store.upsert_many([rule(i, OLD, 990) for i in items], "seller-tool")
    assert again == written
    assert await store.current_revision() == 300


async def test_batch_is_all_or_nothing(store: SqlRuleStore) -> None:
    await store.upsert(rule("taken", seller="7"), "x")
    batch = [rule("a"), rule("b"), rule("taken"), rule("c")]
    with pytest.raises(FailedPreconditionError) as err:
        await store.upsert_many(batch, "y")
    assert err.value.reason == "ITEM_OWNED_BY_OTHER_SELLER"
    assert err.value.violations[0].field == "rules[2].item_id"
    assert await store.current_revision() == 1
    assert [r.item_id for r in (await store.load_all())[0]] == ["taken"]
    assert len(await store.changes_since(0, 100)) == 1


async def test_batch_refuses_the_same_item_and_crowd_twice(store: SqlRuleStore) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        await store.upsert_many([rule("a", ALL), rule("b"), rule("a", ALL, 1)], "y")
    assert err.value.reason == "DUPLICATE_RULE"
    assert err.value.violations[0].field == "rules[2]"
    assert await store.current_revision() == 0


# --- list -----------------------------------------------------------------------------------


async def test_list_pages_are_stable_and_complete(store: SqlRuleStore) -> None:
    mine = [rule(f"i{n:02d}", kind) for n in range(9) for kind in (ALL, BOUGHT)]
    await store.upsert_many(mine, "a")
    await store.upsert_many([rule(f"x{n}", seller="7") for n in range(5)], "b")
    seen: list[Rule] = []
    token = ""
    pages = 0
    while True:
        page, token = await store.list_rules("42", "", 5, token)
        pages += 1
        assert len(page) <= 5
        seen.extend(page)
        if pages == 2:  # writes between pages do not shift or repeat what follows
            await store.upsert(rule("i00", OLD), "a")
            await store.upsert(rule("i01", ALL, 1), "a")
        if not token:
            break
    keys = [(r.item_id, r.kind) for r in seen]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert {r.seller_id for r in seen} == {"42"}
    assert set(keys) >= {(r.item_id, r.kind) for r in mine}
    one, _ = await store.list_rules("", "i03", 10, "")
    assert [(r.item_id, r.kind) for r in one] == [("i03", ALL), ("i03", BOUGHT)]
    everything, token = await store.list_rules("", "", 1000, "")
    assert len(everything) == 24 and token == ""


async def test_list_refuses_forged_or_foreign_tokens(store: SqlRuleStore) -> None:
    await store.upsert_many([rule(f"i{n}") for n in range(3)], "a")
    _, token = await store.list_rules("42", "", 1, "")
    assert token
    for bad, filters in (("garbage!!", ("42", "")), (token, ("7", "")), (token[:-3], ("42", ""))):
        with pytest.raises(InvalidArgumentError) as err:
            await store.list_rules(filters[0], filters[1], 1, bad)
        assert err.value.reason == "INVALID_PAGE_TOKEN"
        assert err.value.violations[0].field == "page_token"


# --- change feed, audit, snapshots ---------------------------------------------------------


async def test_change_feed_lists_every_write_in_revision_order(
    store: SqlRuleStore, clock: ManualClock
) -> None:
    a, _ = await store.upsert(rule("i1"), "alice")
    clock.advance(10)
    await store.upsert(rule("i1", amount=1700), "bob")
    await store.upsert(rule("i1"), "bob")  # back to 1888: a change
    await store.upsert(rule("i1"), "bob")  # no-op: no entry
    await store.delete(a.rule_id, "carol")
    changes = await store.changes_since(0, 100)
    assert [c.revision for c in changes] == [1, 2, 3, 4]
    assert [c.action for c in changes] == ["UPSERT", "UPSERT", "UPSERT", "DELETE"]
    assert [c.rule.price.amount_minor for c in changes] == [1888, 1700, 1888, 1888]
    assert [c.actor for c in changes] == ["alice", "bob", "bob", "carol"]
    assert changes[1].change_ms == changes[0].change_ms + 10
    assert [c.revision for c in await store.changes_since(2, 1)] == [3]
    assert await store.changes_since(4, 100) == []


async def test_history_lists_a_sellers_price_changes_newest_first(store: SqlRuleStore) -> None:
    await store.upsert(rule("i1", amount=1000), "alice")
    await store.upsert(rule("i2", amount=2000), "alice")
    await store.upsert(rule("x", seller="7"), "mallory")
    await store.upsert(rule("i1", amount=900), "bob")
    changes, token = await store.history("42", "", 100, "")
    assert token == ""
    assert [(c.revision, c.item_id, c.rule.price.amount_minor, c.actor) for c in changes] == [
        (4, "i1", 900, "bob"),
        (2, "i2", 2000, "alice"),
        (1, "i1", 1000, "alice"),
    ]
    item_only, _ = await store.history("42", "i1", 100, "")
    assert [c.revision for c in item_only] == [4, 1]
    page1, token = await store.history("42", "", 2, "")
    page2, token2 = await store.history("42", "", 2, token)
    assert [c.revision for c in page1 + page2] == [4, 2, 1] and token2 == ""
    with pytest.raises(InvalidArgumentError):
        await store.history("7", "", 2, token)  # a token of another seller's history


async def test_snapshots_are_consistent_with_their_revision(store: SqlRuleStore) -> None:
    await store.upsert_many([rule("i1", ALL), rule("i1", OLD, 1500), rule("i2")], "a")
    rules, revision = await store.rules_for_item("i1")
    assert revision == 3
    assert [(r.kind, r.price.amount_minor) for r in rules] == [(ALL, 1888), (OLD, 1500)]
    everything, revision = await store.load_all()
    assert revision == 3 and len(everything) == 3
    assert max(r.revision for r in everything) == revision


async def test_rules_of_many_items_and_a_bounded_load(store: SqlRuleStore) -> None:
    """The two reads of a bounded rule index: a page's misses in one query, and a start-up
    load that stops after ``max_items`` items but says whether there are more."""
    await store.upsert_many(
        [rule("i1", ALL), rule("i1", OLD, 1500), rule("i2"), rule("i3", BOUGHT)], "a"
    )
    rules, revision = await store.rules_for_items(["i3", "i1", "none", "i3"])
    assert revision == 4
    assert sorted((r.item_id, r.kind) for r in rules) == [("i1", ALL), ("i1", OLD), ("i3", BOUGHT)]
    assert await store.rules_for_items([]) == ([], 4)
    # an id that looks like SQL is just an id
    assert (await store.rules_for_items(["i1') OR ('1'='1"]))[0] == []

    for cap, items in ((1, {"i1", "i2"}), (2, {"i1", "i2", "i3"}), (3, {"i1", "i2", "i3"})):
        some, revision = await store.load_all(max_items=cap)
        assert revision == 4
        assert {r.item_id for r in some} == items  # cap + 1 items: "there are more"
        # whole items only: both of i1's rules, never one of them
        assert sum(r.item_id == "i1" for r in some) == 2
    everything, _ = await store.load_all()
    assert len(everything) == 4


async def test_rule_index_follows_the_store(store: SqlRuleStore, store_url: str) -> None:
    settings = settings_for(store_url)
    a, _ = await store.upsert(rule("i1", ALL), "a")
    index = RuleIndex(store, settings, ManualClock())
    await index.load()
    assert index.loaded and index.revision == 1
    assert index.rules_for("i1") == (a,)
    assert index.rules_for("unknown") == ()

    b, _ = await store.upsert(rule("i1", OLD, 1500), "a")
    a2, _ = await store.upsert(rule("i1", ALL, 1700), "a")
    c, _ = await store.upsert(rule("i2"), "a")
    assert await index.refresh() == 3
    assert sorted(index.rules_for("i1"), key=lambda r: r.kind) == [a2, b]
    assert index.rules_for("i2") == (c,)
    await store.delete(b.rule_id, "a")
    await store.delete(c.rule_id, "a")
    assert await index.refresh() == 2
    assert index.rules_for("i1") == (a2,)
    assert index.rules_for("i2") == ()
    assert index.revision == await store.current_revision() == 6
    assert len(index) == 1
    assert await index.refresh() == 0


async def test_written_rule_round_trips_every_field(store: SqlRuleStore) -> None:
    r = rule("i1", BOUGHT, 10**15, currency="JPY", start_ms=0, end_ms=253_402_300_799_999)
    written, _ = await store.upsert(r, "a")
    assert replace(written, rule_id="", revision=0, create_ms=0, update_ms=0) == r
    assert await store.get(written.rule_id) == written
    assert (await store.changes_since(0, 1))[0].rule == written


# --- seller-defined crowds ------------------------------------------------------------------------
async def test_crowds_rules_that_target_them_and_the_strict_read(store: SqlRuleStore) -> None:
    loyal = await store.create_crowd(CrowdDef("42", "loyal", Predicate(min_follow_days=30)), "a")
    vip = await store.create_crowd(CrowdDef("42", "vip", None, display_name="VIPs"), "a")
    other = await store.create_crowd(CrowdDef("7", "vip", None), "a")
    assert (loyal.list_handle, vip.list_handle, other.list_handle) == (0, 1, 2)
    assert await store.get_crowd("42", "vip") == vip
    r1, _ = await store.upsert(
        Rule("", "42", "i1", CrowdKind.SELLER_DEFINED, Money("CNY", 500), crowd_id="loyal"), "a"
    )
    r2, _ = await store.upsert(
        Rule("", "42", "i1", CrowdKind.SELLER_DEFINED, Money("CNY", 400), crowd_id="vip"), "a"
    )
    r3, _ = await store.upsert(rule("i1", CrowdKind.ALL_FANS, 900), "a")
    assert r1.rule_id != r2.rule_id  # two seller crowds on one item are two rules
    rules, crowds, revision = await store.rules_with_crowds("i1")
    assert {r.rule_id for r in rules} == {r1.rule_id, r2.rule_id, r3.rule_id}
    assert crowds == {("42", "loyal"): loyal, ("42", "vip"): vip}  # 7's vip is not this item's
    assert revision == await store.current_revision()
    listed, token = await store.list_rules("42", "i1", 2, "")
    rest, end = await store.list_rules("42", "i1", 2, token)
    assert {r.rule_id for r in listed + rest} == {r1.rule_id, r2.rule_id, r3.rule_id} and not end
    with pytest.raises(FailedPreconditionError) as err:
        await store.delete_crowd("42", "vip", "a")
    assert err.value.reason == "CROWD_IN_USE"
    await store.delete(r2.rule_id, "a")
    await store.delete_crowd("42", "vip", "a")
    with pytest.raises(NotFoundError):
        await store.get_crowd("42", "vip")
    changes = await store.crowd_changes_since(0, 100)
    assert [(c.revision, c.action, c.crowd.name) for c in changes] == [
        (1, "CREATE", "sellers/42/crowds/loyal"),
        (2, "CREATE", "sellers/42/crowds/vip"),
        (3, "CREATE", "sellers/7/crowds/vip"),
        (4, "DELETE", "sellers/42/crowds/vip"),
    ]
    history = await store.history("42", "i1", 10, "")
    assert [(c.action, c.rule.crowd_id) for c in history[0]][:2] == [
        ("DELETE", "vip"),
        ("UPSERT", ""),
    ]
