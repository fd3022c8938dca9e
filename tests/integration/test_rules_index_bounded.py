"""A bounded RuleIndex (``rule_index_max_items``) over a real SQLite store.

The index is then a least-recently-used cache of items (negative entries included) that follows
the change feed. What must hold: memory stays within the bound, a page's misses cost one store
read, and no change is ever missed: after the feed is followed every answer equals the store,
and before that every answer equals the store at some revision not older than the index's.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pricing_service.config import Settings
from pricing_service.domain import CrowdKind, ManualClock, Money, Rule
from pricing_service.metrics import Metrics
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_testing.rule_stores import settings_for, sqlite_url

pytestmark = pytest.mark.integration

ITEMS = ["i1", "i2", "i3", "i4", "i5"]
CAP = 2


def rule_of(item: str, kind: CrowdKind = CrowdKind.ALL_FANS, amount: int = 100) -> Rule:
    return Rule("", "42", item, kind, Money("CNY", amount))


class CountingStore:
    """The real store, counting the index's miss reads; ``hold`` pauses a read after the
    store answered (so the test can move the store and the feed on meanwhile)."""

    def __init__(self, store: SqlRuleStore) -> None:
        self.store = store
        self.reads: list[list[str]] = []
        self.hold: asyncio.Event | None = None
        self.answered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def rules_for_items(self, item_ids: Sequence[str]) -> tuple[list[Rule], int]:
        self.reads.append(list(item_ids))
        got = await self.store.rules_for_items(item_ids)
        self.answered.set()
        if self.hold is not None:
            await self.hold.wait()
        return got


async def read(index: RuleIndex, items: Sequence[str]) -> list[tuple[Rule, ...]]:
    """What a page does: look up, then fetch the misses."""
    found = index.lookup(items)
    missing = [i for i, r in zip(items, found, strict=True) if r is None]
    fetched = await index.fetch(missing) if missing else {}
    return [fetched[i] if r is None else r for i, r in zip(items, found, strict=True)]


def content(rules: Sequence[Rule]) -> set[tuple[CrowdKind, int]]:
    return {(r.kind, r.price.amount_minor) for r in rules}


# --- the model ------------------------------------------------------------------------------


class BoundedIndexMachine(RuleBasedStateMachine):
    """Random writes, deletes, page reads (with and without following the feed) and reloads
    against a plain model that remembers the store's content at every revision."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="rules-bounded-"))
        self.settings = settings_for(sqlite_url(self.dir), rule_index_max_items=CAP)
        self.store: SqlRuleStore = self.run(open_rule_store(self.settings))
        self.counting = CountingStore(self.store)
        self.index = RuleIndex(self.counting, self.settings, ManualClock())
        self.run(self.index.load())
        self.model: dict[tuple[str, CrowdKind], int] = {}
        self.ids: dict[tuple[str, CrowdKind], str] = {}
        self.history: list[dict[tuple[str, CrowdKind], int]] = [{}]  # revision -> content

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def expected(self, item: str, revision: int) -> set[tuple[CrowdKind, int]]:
        return {(k[1], v) for k, v in self.history[revision].items() if k[0] == item}

    @rule(
        item=st.sampled_from(ITEMS),
        kind=st.sampled_from([CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS]),
        amount=st.sampled_from([100, 200]),
    )
    def upsert(self, item: str, kind: CrowdKind, amount: int) -> None:
        written, changed = self.run(self.store.upsert(rule_of(item, kind, amount), "m"))
        self.ids[(item, kind)] = written.rule_id
        if changed:
            self.model[(item, kind)] = amount
            self.history.append(dict(self.model))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.run(self.store.delete(self.ids.pop(key), "m"))
        del self.model[key]
        self.history.append(dict(self.model))

    @rule(items=st.lists(st.sampled_from(ITEMS), min_size=1, max_size=4))
    def page_without_following_the_feed(self, items: list[str]) -> None:
        """Answers may be behind the store, but never behind the index's own revision."""
        since = self.index.revision
        got = self.run(read(self.index, items))
        now = len(self.history) - 1
        for item, rules in zip(items, got, strict=True):
            seen = content(rules)
            assert any(seen == self.expected(item, r) for r in range(since, now + 1)), (
                item,
                seen,
                since,
                now,
            )

    @rule()
    def follow_the_feed(self) -> None:
        self.run(self.index.refresh())

    @rule()
    def reload(self) -> None:
        self.run(self.index.load())

    @invariant()
    def within_the_bound(self) -> None:
        assert self.index.items <= CAP
        assert len(self.index) == sum(len(self.index.rules_for(i)) for i in ITEMS)

    @invariant()
    def after_the_feed_every_answer_is_the_store(self) -> None:
        self.run(self.index.refresh())
        assert self.index.revision == len(self.history) - 1
        got = self.run(read(self.index, ITEMS))
        for item, rules in zip(ITEMS, got, strict=True):
            assert content(rules) == self.expected(item, len(self.history) - 1), item

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


BoundedIndexMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_bounded_index_matches_the_store = BoundedIndexMachine.TestCase


# --- the cases the model cannot time ---------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlRuleStore]:
    s = await open_rule_store(settings_for(sqlite_url(tmp_path)))
    yield s
    await s.close()


def bounded(store: SqlRuleStore, cap: int, **overrides: object) -> Settings:
    return settings_for(store.settings.rule_store_url, rule_index_max_items=cap, **overrides)


async def test_small_catalogue_is_held_whole_and_never_reads_the_store(
    store: SqlRuleStore,
) -> None:
    a, _ = await store.upsert(rule_of("a"), "t")
    counting = CountingStore(store)
    metrics = Metrics()
    index = RuleIndex(counting, bounded(store, 3), ManualClock(), metrics)
    await index.load()
    assert index.complete
    assert index.lookup(["a", "never-had-rules"]) == [(a,), ()]
    assert counting.reads == []
    assert metrics.rule_index_complete._value.get() == 1


async def test_growing_past_the_bound_turns_the_index_into_a_cache(
    store: SqlRuleStore, caplog: pytest.LogCaptureFixture
) -> None:
    counting = CountingStore(store)
    metrics = Metrics()
    index = RuleIndex(counting, bounded(store, 3), ManualClock(), metrics)
    await index.load()
    assert index.complete and index.items == 0
    written = {}
    for item in ("a", "b", "c", "d", "e"):
        written[item], _ = await store.upsert(rule_of(item), "t")
    await index.refresh()
    assert not index.complete
    assert index.items == 3 and len(index) == 3
    assert index.evictions == 2
    assert metrics.rule_index_complete._value.get() == 0
    # every item still answers its rule: held ones at once, the others from the store
    got = await read(index, ["a", "b", "c", "d", "e", "none"])
    assert got == [(written[i],) for i in "abcde"] + [()]
    assert index.items == 3
    assert counting.reads and all(len(r) <= 6 for r in counting.reads)


async def test_a_start_up_over_the_bound_holds_only_the_bound(store: SqlRuleStore) -> None:
    await store.upsert_many([rule_of(f"i{n}") for n in range(10)], "t")
    index = RuleIndex(store, bounded(store, 4), ManualClock())
    await index.load()
    assert not index.complete
    assert index.items == 4 and len(index) == 4
    assert index.lookup(["i9"]) == [None]  # not held: a miss, not "no rules"


async def test_a_negative_entry_follows_the_feed(store: SqlRuleStore) -> None:
    await store.upsert_many([rule_of(f"x{n}") for n in range(3)], "t")
    counting = CountingStore(store)
    index = RuleIndex(counting, bounded(store, 2), ManualClock())
    await index.load()
    assert await read(index, ["plain"]) == [()]
    reads = len(counting.reads)
    assert index.lookup(["plain"]) == [()]  # held as "no rules": no second read
    assert len(counting.reads) == reads
    r, _ = await store.upsert(rule_of("plain", amount=555), "t")
    await index.refresh()
    assert index.lookup(["plain"]) == [(r,)]  # the feed added it, no read either
    await store.delete(r.rule_id, "t")
    await index.refresh()
    assert index.lookup(["plain"]) == [()]  # deleted: still held, as empty
    assert len(counting.reads) == reads


async def test_a_page_of_misses_costs_one_read_and_concurrent_pages_share_it(
    store: SqlRuleStore,
) -> None:
    await store.upsert_many([rule_of(f"i{n}") for n in range(10)], "t")
    counting = CountingStore(store)
    index = RuleIndex(counting, bounded(store, 2), ManualClock())
    await index.load()
    counting.hold = asyncio.Event()
    pages = [["i5", "i6", "i7"], ["i6", "i7", "i5"], ["i7", "i8"]]
    tasks = [asyncio.create_task(read(index, p)) for p in pages]
    await asyncio.sleep(0.05)
    counting.hold.set()
    results = await asyncio.gather(*tasks)
    # the first page reads i5..i7, the second waits for it, the third reads only i8
    assert counting.reads == [["i5", "i6", "i7"], ["i8"]]
    for page, got in zip(pages, results, strict=True):
        assert [r[0].item_id for r in got] == page
    assert index.items == 2


async def test_a_caller_giving_up_does_not_cancel_the_read(store: SqlRuleStore) -> None:
    r, _ = await store.upsert(rule_of("slow"), "t")
    await store.upsert_many([rule_of(f"i{n}") for n in range(3)], "t")
    counting = CountingStore(store)
    index = RuleIndex(counting, bounded(store, 2), ManualClock())
    await index.load()
    counting.hold = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await index.fetch(["slow"])
    counting.hold.set()
    for _ in range(100):
        if index.lookup(["slow"]) == [(r,)]:
            break
        await asyncio.sleep(0.01)
    assert index.lookup(["slow"]) == [(r,)]
    assert len(counting.reads) == 1


async def test_a_read_overtaken_by_the_feed_is_answered_but_not_held(
    store: SqlRuleStore,
) -> None:
    """The read answers at revision S; meanwhile the item changes and the feed, which ignores
    items it does not hold, moves past S. Holding the read would serve the old rule forever."""
    old, _ = await store.upsert(rule_of("zz-hot", amount=100), "t")
    await store.upsert_many([rule_of(f"i{n}") for n in range(3)], "t")
    counting = CountingStore(store)
    index = RuleIndex(counting, bounded(store, 2), ManualClock())
    await index.load()
    assert index.lookup(["zz-hot"]) == [None]
    counting.hold = asyncio.Event()
    page = asyncio.create_task(index.fetch(["zz-hot"]))
    await counting.answered.wait()  # the store answered with amount 100
    new, _ = await store.upsert(rule_of("zz-hot", amount=50), "t")
    await index.refresh()  # the feed passes the change: "zz-hot" is not held, so it is skipped
    counting.hold.set()
    assert (await page)["zz-hot"] == (old,)  # the page still gets a real answer of its time
    assert index.stale_reads == 1
    assert index.lookup(["zz-hot"]) == [None]  # but it was not held
    counting.hold = None
    assert (await index.fetch(["zz-hot"]))["zz-hot"] == (new,)
    assert index.lookup(["zz-hot"]) == [(new,)]


async def test_a_read_ahead_of_the_feed_is_not_rolled_back_by_it(
    store: SqlRuleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read reflects changes the feed has not applied yet: applying them again (or an
    older one after a newer) must not make the held entry go back in time, not even between
    two batches of the feed (pages are answered between them)."""
    monkeypatch.setattr("pricing_service.rules.index.FEED_BATCH", 1)
    await store.upsert_many([rule_of(f"i{n}") for n in range(3)], "t")
    seen: list[set[tuple[CrowdKind, int]]] = []
    index = RuleIndex(
        store,
        bounded(store, 2),
        ManualClock(),
        on_change=lambda changes: seen.append(content(index.rules_for("zz-x"))),
    )
    await index.load()
    await store.upsert(rule_of("zz-x", amount=100), "t")
    await store.upsert(rule_of("zz-x", CrowdKind.OLD_FANS, amount=90), "t")
    latest, _ = await store.upsert(rule_of("zz-x", amount=80), "t")
    got = await index.fetch(["zz-x"])  # the store at its latest revision
    assert content(got["zz-x"]) == {(CrowdKind.ALL_FANS, 80), (CrowdKind.OLD_FANS, 90)}
    seen.clear()
    await index.refresh()  # replays amount 100, then 90, then 80 for "zz-x": all already in
    assert len(seen) == 3  # one batch per change
    assert all(s == {(CrowdKind.ALL_FANS, 80), (CrowdKind.OLD_FANS, 90)} for s in seen), seen
    assert content(index.rules_for("zz-x")) == {(CrowdKind.ALL_FANS, 80), (CrowdKind.OLD_FANS, 90)}
    assert latest in index.rules_for("zz-x")
    deleted_rev = await store.delete(latest.rule_id, "t")
    await index.refresh()
    assert index.revision == deleted_rev
    assert content(index.rules_for("zz-x")) == {(CrowdKind.OLD_FANS, 90)}
