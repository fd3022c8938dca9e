"""Model-based test: random upserts, batches and deletes against a real SQLite store.

A plain-Python model decides what every operation should do (accept, refuse with which reason,
change or not); after each step the store's content, revision and change feed must match it,
and a RuleIndex following the feed must equal a fresh load.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.domain import CrowdKind, ManualClock, Money, Rule
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_testing.rule_stores import settings_for, sqlite_url

pytestmark = pytest.mark.integration

SELLERS = st.sampled_from(["s1", "s2"])
ITEMS = st.sampled_from(["i1", "i2", "i3"])
#: a built-in kind or a seller's crowd id: "vip" exists for both sellers, "loyal" for s1 only
KINDS = st.sampled_from(
    [CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS, "vip", "loyal"]
)
CROWDS = {("s1", "vip"), ("s2", "vip"), ("s1", "loyal")}
AMOUNTS = st.sampled_from([100, 200])
MAX_PER_ITEM = 2

Ref = CrowdKind | str
Key = tuple[str, Ref]


def make(seller: str, item: str, ref: Ref, amount: int) -> Rule:
    if isinstance(ref, str):
        return Rule("", seller, item, CrowdKind.SELLER_DEFINED, Money("CNY", amount), crowd_id=ref)
    return Rule("", seller, item, ref, Money("CNY", amount))


def ref_of(r: Rule) -> Ref:
    return r.crowd_id or r.kind


class RuleStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="rules-model-"))
        self.settings = settings_for(sqlite_url(self.dir), max_rules_per_item=MAX_PER_ITEM)
        self.store: SqlRuleStore = self.run(open_rule_store(self.settings))
        for seller, crowd_id in sorted(CROWDS):
            self.run(self.store.create_crowd(CrowdDef(seller, crowd_id, Predicate()), "m"))
        self.index = RuleIndex(self.store, self.settings, ManualClock())
        self.run(self.index.load())
        self.model: dict[Key, tuple[str, int]] = {}  # (item, kind) -> (seller, amount)
        self.ids: dict[Key, str] = {}
        self.revision = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def expect(self, seller: str, item: str, kind: Ref, amount: int) -> str | None:
        """The refusal reason the model predicts for one upsert, or None."""
        on_item = {k: v for k, v in self.model.items() if k[0] == item}
        if any(s != seller for s, _ in on_item.values()):
            return "ITEM_OWNED_BY_OTHER_SELLER"
        new = (item, kind) not in self.model
        if new and isinstance(kind, str) and (seller, kind) not in CROWDS:
            return "CROWD_NOT_FOUND"
        if new and len(on_item) >= MAX_PER_ITEM:
            return "TOO_MANY_RULES_FOR_ITEM"
        return None

    def apply(self, seller: str, item: str, kind: Ref, amount: int) -> bool:
        changed = self.model.get((item, kind)) != (seller, amount)
        self.model[(item, kind)] = (seller, amount)
        if changed:
            self.revision += 1
        return changed

    @rule(seller=SELLERS, item=ITEMS, kind=KINDS, amount=AMOUNTS)
    def upsert(self, seller: str, item: str, kind: Ref, amount: int) -> None:
        r = make(seller, item, kind, amount)
        reason = self.expect(seller, item, kind, amount)
        if reason is not None:
            with pytest.raises(FailedPreconditionError) as err:
                self.run(self.store.upsert(r, "m"))
            assert err.value.reason == reason
            return
        written, changed = self.run(self.store.upsert(r, "m"))
        assert changed == self.apply(seller, item, kind, amount)
        assert written.revision <= self.revision
        self.ids.setdefault((item, kind), written.rule_id)
        assert written.rule_id == self.ids[(item, kind)]

    @rule(
        seller=SELLERS,
        entries=st.lists(st.tuples(ITEMS, KINDS, AMOUNTS), min_size=1, max_size=4),
    )
    def batch(self, seller: str, entries: list[tuple[str, Ref, int]]) -> None:
        rules = [make(seller, i, k, a) for i, k, a in entries]
        keys = [(i, k) for i, k, _ in entries]
        if len(set(keys)) != len(keys):
            with pytest.raises(InvalidArgumentError):
                self.run(self.store.upsert_many(rules, "m"))
            return
        saved = (dict(self.model), self.revision)
        for n, (i, k, a) in enumerate(entries):
            reason = self.expect(seller, i, k, a)
            if reason is not None:
                self.model, self.revision = saved  # all or nothing
                with pytest.raises(FailedPreconditionError) as err:
                    self.run(self.store.upsert_many(rules, "m"))
                assert err.value.reason == reason
                field = "crowd_id" if reason == "CROWD_NOT_FOUND" else "item_id"
                assert err.value.violations[0].field == f"rules[{n}].{field}"
                return
            self.apply(seller, i, k, a)
        written = self.run(self.store.upsert_many(rules, "m"))
        for w in written:
            self.ids.setdefault((w.item_id, ref_of(w)), w.rule_id)
            assert w.rule_id == self.ids[(w.item_id, ref_of(w))]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model, key=str)))
        rule_id = self.ids.pop(key)
        del self.model[key]
        self.revision += 1
        assert self.run(self.store.delete(rule_id, "m")) == self.revision
        with pytest.raises(NotFoundError):
            self.run(self.store.delete(rule_id, "m"))

    @rule()
    def follow_the_feed(self) -> None:
        self.run(self.index.refresh())

    @invariant()
    def store_matches_model(self) -> None:
        rules, revision = self.run(self.store.load_all())
        assert revision == self.revision
        assert {(r.item_id, ref_of(r)): (r.seller_id, r.price.amount_minor) for r in rules} == (
            self.model
        )

    @invariant()
    def index_equals_a_fresh_load(self) -> None:
        self.run(self.index.refresh())
        assert self.index.revision == self.revision
        for item in ("i1", "i2", "i3"):
            expected = {(k[1], v) for k, v in self.model.items() if k[0] == item}
            got = {
                (ref_of(r), (r.seller_id, r.price.amount_minor)) for r in self.index.rules_for(item)
            }
            assert got == expected

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


RuleStoreMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_rule_store_matches_its_model = RuleStoreMachine.TestCase
