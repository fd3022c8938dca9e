"""Model-based proof of the membership store against the real Redis.

The model is written from the contract, not from the implementation: the crowd definitions of
the README ("follows the seller", "followed for at least N days", "bought at least K times",
"bought within D days", "on the list") over the *facts delivered* so far, with the merge rules
the README and the layout state (follow: the latest fact by its time wins, an unfollow on equal
times; purchases: counts and times only grow, known for one TTL after the latest purchase fact;
lists: the newest change wins, a removal is remembered for the tombstone TTL), and times kept
to the second (starts rounded up, the last purchase down, expiries up). What is exact when: the
follow state and its start, "bought at least once" and the time of the last purchase follow
every delivered event at once; a purchase event says only "at least one" (events can be
redelivered, so they are never added up): counts above one are known only as of the last
snapshot loaded.

A hypothesis state machine drives it side by side with :class:`MembershipStore`: follows,
unfollows, purchases and list changes (delivered, lost, duplicated, out of order, at equal
times), snapshots cut at any time and loaded late or twice (through the loader's fast path or
the general one), and a clock jumping onto every expiry and every day boundary of the
predicates. After every step: the stored facts equal the model's; every crowd - built-in,
seller-defined predicate, list - has exactly the model's members; CheckDiscountStrict, run
against the same Redis, grants exactly what the model grants; and the buyer's key outlives
every live fact.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pricing_service.breaker import CircuitBreaker
from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.domain import CrowdKey, CrowdKind, ManualClock, Money, Rule
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite, SnapshotEncoder, Ttls
from pricing_service.membership.layout import Facts, Follow, ListEntry, MembershipLayout, Purchases
from pricing_service.membership.store import MembershipStore
from pricing_service.metrics import Metrics
from pricing_service.pricing import PricingCore, Verdict

pytestmark = pytest.mark.integration

HOUR = 3_600_000
DAY = 24 * HOUR
TICK = 3 * HOUR
TTLS = Ttls(membership_ms=2 * DAY, tombstone_ms=3 * DAY, old_fan_min_ms=1 * DAY)
OLD_FAN_DAYS = 1
USERS = ("u1", "42", "b{r}ace")  # a numeric id and one with braces in it
SELLERS = ("7", "0042", "shop-x")  # canonical numeric, leading zero, not numeric
#: the sellers' own crowds: (seller, crowd_id) -> definition in the README's words
PREDICATES = {
    ("7", "loyal"): dict(min_days=1),
    ("7", "new"): dict(max_days=2),
    ("0042", "buyers2"): dict(min_purchases=2),
    ("0042", "recent"): dict(within_days=1),
    ("shop-x", "mix"): dict(min_days=1, max_days=3, min_purchases=1, within_days=2),
}
LISTS = {("7", "vip"): 5, ("shop-x", "staff"): 9}
DEFS: dict[CrowdKey, CrowdDef] = {
    **{
        key: CrowdDef(
            key[0],
            key[1],
            Predicate(
                min_follow_days=p.get("min_days", 0),
                max_follow_days=p.get("max_days"),
                min_purchases=p.get("min_purchases", 0),
                purchased_within_days=p.get("within_days"),
            ),
        )
        for key, p in PREDICATES.items()
    },
    **{key: CrowdDef(key[0], key[1], None, list_handle=h) for key, h in LISTS.items()},
}
BUILTIN = (CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS)
ALL_KEYS: list[CrowdKey] = [(s, k) for s in SELLERS for k in BUILTIN] + list(DEFS)


def _start_ms() -> int:
    """A manual clock start ahead of the real clock (key PEXPIREAT uses Redis's real time)."""
    return (time.time_ns() // 1_000_000 // 1000 + 600) * 1000


def up(ms: int) -> int:
    return -(-ms // 1000) * 1000


# --- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FollowFact:
    """A follow (since = when it began) or an unfollow, as kept: times to the second."""

    version: int
    unfollow: bool
    expires: int
    since: int

    def key(self) -> tuple[int, bool, int, int]:
        # the latest fact wins; on equal times the unfollow; then the later expiry, the later start
        return (self.version, self.unfollow, self.expires, self.since)


@dataclass
class PurchaseKnowledge:
    expires: int
    count: int
    last: int  # 0 = unknown


@dataclass(frozen=True)
class ListChange:
    version: int
    removed: bool
    expires: int  # NEVER for an add


NEVER = 2**62


@dataclass
class Model:
    #: every follow fact delivered (for the model-free check: the greatest live one decides)
    follows: dict[tuple[str, str], list[FollowFact]] = field(default_factory=dict)
    #: what is known of the follow: the latest fact by its time, forgotten when it lapses
    follow_now: dict[tuple[str, str], FollowFact] = field(default_factory=dict)
    purchases: dict[tuple[str, str], PurchaseKnowledge] = field(default_factory=dict)
    lists: dict[tuple[str, int], ListChange] = field(default_factory=dict)

    # -- facts delivered --
    def follow_fact(self, user: str, seller: str, f: FollowFact, now: int) -> None:
        k = (user, seller)
        self.follows.setdefault(k, []).append(f)
        cur = self.follow_now.get(k)
        if cur is not None and cur.expires <= now:
            cur = None
        if f.expires > now and (cur is None or f.key() > cur.key()):
            cur = f
        if cur is None:
            self.follow_now.pop(k, None)
        else:
            self.follow_now[k] = cur

    def purchase_fact(
        self, user: str, seller: str, expires: int, count: int, last: int, now: int
    ) -> None:
        """Counts and times only grow; what is known lapses one TTL after the latest fact."""
        k = (user, seller)
        cur = self.purchases.get(k)
        if cur is not None and cur.expires <= now:
            cur = None
        new = PurchaseKnowledge(up(expires), min(count, 65_535), last // 1000 * 1000)
        if new.expires <= now:
            if cur is None:
                self.purchases.pop(k, None)
            return
        if cur is None:
            self.purchases[k] = new
        else:
            self.purchases[k] = PurchaseKnowledge(
                max(cur.expires, new.expires), max(cur.count, new.count), max(cur.last, new.last)
            )

    def list_change(self, user: str, handle: int, c: ListChange, now: int) -> None:
        """The newest change wins; a removal is remembered until it lapses."""
        k = (user, handle)
        cur = self.lists.get(k)
        if cur is not None and cur.expires <= now:
            cur = None
        if cur is None or (c.version, c.removed, c.expires) > (
            cur.version,
            cur.removed,
            cur.expires,
        ):
            self.lists[k] = c
        elif cur is not None:
            self.lists[k] = cur
        if self.lists[k].expires <= now:
            del self.lists[k]

    # -- what is known at `now` --
    def follow(self, user: str, seller: str, now: int) -> FollowFact | None:
        f = self.follow_now.get((user, seller))
        return f if f is not None and f.expires > now else None

    def follows_by_the_greatest_live_fact(self, user: str, seller: str, now: int) -> bool:
        """Model-free: the relation is followed iff the greatest live fact delivered about it
        is a follow (a tombstone outlives the follows it beats: TTLs are so configured)."""
        live = [f for f in self.follows.get((user, seller), []) if f.expires > now]
        top = max(live, key=FollowFact.key, default=None)
        return top is not None and not top.unfollow

    def bought(self, user: str, seller: str, now: int) -> PurchaseKnowledge | None:
        p = self.purchases.get((user, seller))
        return p if p is not None and p.expires > now else None

    def on_list(self, user: str, handle: int, now: int) -> bool:
        c = self.lists.get((user, handle))
        return c is not None and not c.removed and c.expires > now

    # -- the README's crowds --
    def in_crowd(self, user: str, key: CrowdKey, now: int) -> bool:
        seller, ref = key
        if key in LISTS:
            return self.on_list(user, LISTS[key], now)
        if ref == CrowdKind.ALL_FANS:
            cond: dict[str, int] = {}
        elif ref == CrowdKind.OLD_FANS:
            cond = {"min_days": OLD_FAN_DAYS}
        elif ref == CrowdKind.PURCHASED_FANS:
            cond = {"min_purchases": 1}
        else:
            cond = PREDICATES[key]  # type: ignore[index]
        f = self.follow(user, seller, now)
        if f is None or f.unfollow:
            return False  # every predicate crowd starts with "follows the seller"
        followed_for = now - f.since
        if "min_days" in cond and followed_for < cond["min_days"] * DAY:
            return False
        if "max_days" in cond and followed_for > cond["max_days"] * DAY:
            return False
        if "min_purchases" in cond or "within_days" in cond:
            p = self.bought(user, seller, now)
            if p is None or p.count < cond.get("min_purchases", 0):
                return False
            if "within_days" in cond and (p.last == 0 or now - p.last > cond["within_days"] * DAY):
                return False
        return True

    def stored(self, user: str, seller: str, now: int) -> Facts | None:
        f = self.follow(user, seller, now)
        p = self.bought(user, seller, now)
        if f is None and p is None:
            return None
        return Facts(
            None
            if f is None
            else Follow(f.version, f.unfollow, f.expires, 0 if f.unfollow else f.since),
            None if p is None else Purchases(p.expires, p.count, p.last),
        )

    def expiries(self, user: str, now: int) -> list[int]:
        out = []
        for s in SELLERS:
            f, p = self.follow(user, s, now), self.bought(user, s, now)
            out += [x.expires for x in (f, p) if x is not None]
        out += [c.expires for (u, _), c in self.lists.items() if u == user and c.expires > now]
        return out


@dataclass(frozen=True)
class Happened:
    """Something that happened in the source systems (follow graph, orders)."""

    kind: str  # follow | unfollow | purchase
    user: str
    seller: str
    at_ms: int


def export(history: list[Happened], cut: int) -> list[tuple[str, str, int, int, int]]:
    """The T+1 export cut at ``cut``: (user, seller, followed_at, purchases, last purchase)."""
    rows = []
    for user in USERS:
        for seller in SELLERS:
            mine = sorted(
                (h for h in history if h.user == user and h.seller == seller and h.at_ms <= cut),
                key=lambda h: (h.at_ms, h.kind == "unfollow"),
            )
            since: int | None = None
            count = last = 0
            for h in mine:
                if h.kind == "follow" and since is None:
                    since = h.at_ms
                elif h.kind == "unfollow":
                    since = None
                elif h.kind == "purchase":
                    count, last = count + 1, h.at_ms
            if since is not None:
                rows.append((user, seller, since, count, last))
    return rows


# --- the state machine ----------------------------------------------------------------------
class FakeRules:
    """CheckDiscountStrict's rule store: one item per crowd, each with one rule of it."""

    def __init__(self) -> None:
        self.by_item: dict[str, Rule] = {}
        for i, key in enumerate(ALL_KEYS):
            seller, ref = key
            kind = ref if isinstance(ref, CrowdKind) else CrowdKind.SELLER_DEFINED
            crowd_id = ref if isinstance(ref, str) else ""
            self.by_item[f"item{i}"] = Rule(
                f"r{i}", seller, f"item{i}", kind, Money("CNY", 100 + i), crowd_id=crowd_id
            )

    async def rules_with_crowds(
        self, item_id: str
    ) -> tuple[list[Rule], dict[CrowdKey, CrowdDef], int]:
        r = self.by_item[item_id]
        return [r], dict(DEFS), 1


class MembershipMachine(RuleBasedStateMachine):
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=5)
        self.ns = f"test:sm:{uuid.uuid4().hex[:12]}:"
        self.layout = MembershipLayout(self.ns)
        self.t0 = _start_ms()
        self.clock = ManualClock(self.t0)
        self.store = MembershipStore(
            self.redis, self.layout, self.clock, old_fan_min_days=OLD_FAN_DAYS, crowds=DEFS
        )
        self.fake_rules = FakeRules()
        self.core = PricingCore(
            None,  # type: ignore[arg-type]  # the strict path reads no index
            self.fake_rules,
            self.store,
            self.clock,
            Metrics(),
            membership_budget_ms=1000,
            strict_max_lag_ms=10**12,
            breaker=CircuitBreaker(5, 1.0),
        )
        self.model = Model()
        self.history: list[Happened] = []
        self.batches: list[list[MembershipWrite]] = []
        self.snapshots: list[tuple[int, list[tuple[str, str, int, int, int]], bool]] = []
        self.seen: set[int] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        async def clean() -> None:
            keys = [k async for k in self.redis.scan_iter(match=f"{self.ns}*", count=1000)]
            if keys:
                await self.redis.delete(*keys)
            await self.redis.aclose()

        try:
            self.run(clean())
        finally:
            self.loop.close()

    @property
    def now(self) -> int:
        return self.clock.now_ms()

    def deliver(self, writes: list[MembershipWrite]) -> None:
        """Apply to the store, and the same facts to the model (in the model's own terms)."""
        result = self.run(self.store.apply(writes))
        assert not result.failed_users
        assert result.applied + result.stale == len(writes)
        now = self.now
        for w in writes:
            if isinstance(w, derive.ListWrite):
                exp = NEVER if not w.removed else w.version_ms + w.ttl_s * 1000
                self.model.list_change(
                    w.user_id, w.handle, ListChange(w.version_ms, w.removed, exp), now
                )
                continue
            f, p = w.facts.follow, w.facts.purchases
            if f is not None:
                self.model.follow_fact(
                    w.user_id,
                    w.seller_id,
                    FollowFact(f.version_ms, f.tombstone, up(f.expires_ms),
                               0 if f.tombstone else up(max(f.since_ms, 0))),
                    now,
                )  # fmt: skip
            if p is not None:
                self.model.purchase_fact(
                    w.user_id, w.seller_id, p.expires_ms, p.count, p.last_ms, now
                )

    @initialize()
    def load_script(self) -> None:
        self.run(self.store.load_script())

    def pick_time(self, data: st.DataObject, dt: int, jitter: int) -> int:
        """A fresh time near the clock, or (often) one already used: equal versions collide."""
        if bool(self.seen) and data.draw(st.booleans(), label="reuse time"):
            return data.draw(st.sampled_from(sorted(self.seen)), label="time")
        tick = (self.now - self.t0) // TICK + dt
        at = max(self.t0 + tick * TICK + jitter, self.t0 - 30 * TICK)
        self.seen.add(at)
        return at

    @rule(
        kind=st.sampled_from(["follow", "unfollow", "purchase"]),
        user=st.sampled_from(USERS),
        seller=st.sampled_from(SELLERS),
        dt=st.integers(-12, 1),
        jitter=st.sampled_from([0, 0, 1, 999]),
        delivered=st.sampled_from([True, True, True, True, False]),
        data=st.data(),
    )
    def event(
        self,
        kind: str,
        user: str,
        seller: str,
        dt: int,
        jitter: int,
        delivered: bool,
        data: st.DataObject,
    ) -> None:
        """A fact happens (at a time that may be out of order); the stream may lose it."""
        at = self.pick_time(data, dt, jitter)
        self.history.append(Happened(kind, user, seller, at))
        if not delivered:
            return
        writes = getattr(derive, kind)(user, seller, at, TTLS)
        self.batches.append(writes)
        self.deliver(writes)

    @rule(
        key=st.sampled_from(sorted(LISTS)),
        user=st.sampled_from(USERS),
        removed=st.booleans(),
        dt=st.integers(-12, 1),
        data=st.data(),
    )
    def list_change(
        self, key: tuple[str, str], user: str, removed: bool, dt: int, data: st.DataObject
    ) -> None:
        """A seller adds or removes a buyer (API call or a list file: dated, maybe late)."""
        at = self.pick_time(data, dt, 0)
        writes: list[MembershipWrite] = [
            derive.list_change(user, LISTS[key], at, removed=removed, ttls=TTLS)
        ]
        self.batches.append(writes)
        self.deliver(writes)

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """At-least-once delivery: an earlier batch arrives again."""
        self.deliver(data.draw(st.sampled_from(self.batches), label="batch"))

    @rule(dt=st.integers(-12, 0), with_last=st.booleans(), data=st.data())
    def cut_snapshot(self, dt: int, with_last: bool, data: st.DataObject) -> None:
        """The offline export is cut (its rows are frozen now) but not loaded yet."""
        cut = min(self.pick_time(data, dt, 0), self.now)
        self.snapshots.append((cut, export(self.history, cut), with_last))

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data(), batch_rows=st.sampled_from([1, 2, 100]), fast=st.booleans())
    def load_snapshot(self, data: st.DataObject, batch_rows: int, fast: bool) -> None:
        """A cut snapshot is loaded, possibly late, possibly twice, in batches of rows: through
        the general write path or (``fast``) the loader's encoder."""
        cut, rows, with_last = data.draw(st.sampled_from(self.snapshots), label="snapshot")
        for i in range(0, len(rows), batch_rows):
            batch = rows[i : i + batch_rows]
            writes = [
                w
                for u, s, since, n, last in batch
                for w in derive.snapshot_row(u, s, since, n, cut, TTLS, last if with_last else 0)
            ]
            if not fast:
                self.deliver(writes)
                continue
            enc = SnapshotEncoder(cut, TTLS)
            args: dict[str, list[str | bytes]] = {}
            for u, s, since, n, last in batch:
                enc.add(args, u, s, since, n, last if with_last else 0)
            result = self.run(self.store.apply_args(args))
            assert not result.failed_users
            self.deliver_model_only(writes)

    def deliver_model_only(self, writes: list[MembershipWrite]) -> None:
        store, self.store = self.store, _NullStore()  # type: ignore[assignment]
        try:
            self.deliver(writes)
        finally:
            self.store = store

    @rule(ms=st.sampled_from([1, 999, 1000, TICK, 3 * TICK, 8 * TICK]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule(data=st.data(), offset=st.sampled_from([-1, 0, 1]))
    def advance_to_a_boundary(self, data: st.DataObject, offset: int) -> None:
        """Put the clock exactly on (or 1 ms around) an expiry or a day boundary of a
        predicate: the cases where off-by-one errors live."""
        now = self.now
        points = set()
        for u in USERS:
            points.update(self.model.expiries(u, now))
            for s in SELLERS:
                f = self.model.follow(u, s, now)
                if f is not None and not f.unfollow:
                    points.update(f.since + d * DAY for d in (1, 2, 3))
                p = self.model.bought(u, s, now)
                if p is not None and p.last:
                    points.update(p.last + d * DAY for d in (1, 2))
        targets = sorted(t + offset for t in points if t < NEVER and t + offset > now)
        if targets:
            self.clock.advance(data.draw(st.sampled_from(targets[:30]), label="boundary") - now)

    @invariant()
    def store_equals_model(self) -> None:
        now = self.now
        for user in USERS:
            got = self.run(self.store.all_fields(user))
            facts = {w: v.live(now) for (kind, w), v in got.items() if kind == "facts"}
            want = {s: self.model.stored(user, s, now) for s in SELLERS}
            assert {s: facts.get(s) for s in SELLERS} == want, user
            lists = {w: v for (kind, w), v in got.items() if kind == "list"}
            for h in LISTS.values():
                entry: ListEntry | None = lists.get(h)
                member = entry is not None and entry.is_member(now)
                assert member == self.model.on_list(user, h, now), (user, h)
            assert all(kind in ("facts", "list") for kind, _ in got), got  # no legacy field
            # the key outlives every live fact (and never keeps a buyer who has none alive)
            expire_at = self.run(self.redis.pexpiretime(self.layout.user_key(user)))
            alive = self.model.expiries(user, now)
            if alive:
                assert expire_at == -1 or expire_at >= max(alive), (user, expire_at, alive)
                assert (expire_at == -1) == (NEVER in alive or any(
                    c.expires == NEVER for (u, _), c in self.model.lists.items() if u == user
                )) or expire_at == -1, user  # fmt: skip
        assert not self.store.anomaly_counts.keys() - {"no_record"}

    @invariant()
    def every_crowd_has_the_models_members(self) -> None:
        now = self.now
        for user in USERS:
            got = self.run(self.store.member_keys(user, ALL_KEYS))
            want = {k for k in ALL_KEYS if self.model.in_crowd(user, k, now)}
            assert got == want, (user, sorted(map(str, got ^ want)))
            for s in SELLERS:
                fans = (s, CrowdKind.ALL_FANS) in got
                assert fans == self.model.follows_by_the_greatest_live_fact(user, s, now)
            reasons: dict[CrowdKey, str] = {}
            assert self.run(self.store.member_keys(user, ALL_KEYS, reasons=reasons)) == got
            assert set(reasons) == set(ALL_KEYS) and all(reasons.values())

    @invariant()
    def strict_grants_exactly_what_the_model_grants(self) -> None:
        now = self.now
        self.run(self.redis.set(self.layout.watermark_key, str(10**15)))  # a fresh watermark
        user = USERS[(now // 1000) % len(USERS)]
        items = sorted(self.fake_rules.by_item)
        for item in items[(now // 1000) % 5 :: 5]:  # a fifth of the crowds per step
            r = self.fake_rules.by_item[item]
            res = self.run(self.core.strict(user, item, None, "", time_remaining_s=None))
            member = self.model.in_crowd(user, r.crowd_key, now)
            assert res.verdict == (Verdict.ELIGIBLE if member else Verdict.NOT_IN_CROWD), (
                user,
                r.crowd_key,
            )
            if member:
                assert res.rule == r and res.price == r.price


class _NullStore:
    """Stands in for the store when the writes were already applied another way."""

    async def apply(self, writes: list[MembershipWrite]) -> Any:
        from pricing_service.membership.writer import ApplyResult  # noqa: PLC0415

        return ApplyResult(applied=len(writes))


def test_store_matches_model(redis_url: str) -> None:
    MembershipMachine.redis_url = redis_url
    run_state_machine_as_test(
        MembershipMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=30,
            deadline=None,
            report_multiple_bugs=False,  # shrink one failure fast rather than several slowly
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# --- order independence -----------------------------------------------------------------------
_SELLERS = ("7", "x")


@st.composite
def raw_writes(draw: st.DrawFn, t0: int) -> list[MembershipWrite]:
    out: list[MembershipWrite] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["follow", "unfollow", "purchase", "row", "list"]))
        at = t0 + draw(st.integers(0, 3)) * 1000 + draw(st.sampled_from([0, 1]))
        seller = draw(st.sampled_from(_SELLERS))
        t = draw(st.sampled_from([TTLS, Ttls(60_000, 90_000, 0), Ttls(61_000, 60_001, 0)]))
        if kind == "row":
            out += derive.snapshot_row(
                "b", seller, at - draw(st.integers(0, 5)) * DAY, draw(st.integers(0, 3)), at, t,
                at - 500 if draw(st.booleans()) else 0,
            )  # fmt: skip
        elif kind == "list":
            out.append(derive.list_change("b", 3, at, removed=draw(st.booleans()), ttls=t))
        else:
            out += getattr(derive, kind)("b", seller, at, t)
    return out


@settings(max_examples=100, deadline=None)
@given(data=st.data(), order=st.randoms(use_true_random=False))
def test_writes_commute(redis_url: str, data: st.DataObject, order: random.Random) -> None:
    """Any arrival order of the same facts, in any grouping, replays included, ends in the same
    hash, field for field, and the same key expiry."""
    t0 = _start_ms()
    writes = data.draw(raw_writes(t0))
    ns = f"test:comm:{uuid.uuid4().hex[:12]}:"

    def as_user(user: str, ws: list[MembershipWrite]) -> list[MembershipWrite]:
        from dataclasses import replace  # noqa: PLC0415

        return [replace(w, user_id=user) for w in ws]

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
        store = MembershipStore(client, MembershipLayout(ns), ManualClock(t0))
        try:
            shuffled = list(writes)
            order.shuffle(shuffled)
            await store.apply(as_user("a", writes))
            for i in range(0, len(shuffled), 3):  # several calls, and one replayed
                await store.apply(as_user("b", shuffled[i : i + 3]))
            await store.apply(as_user("b", shuffled[:2]))
            got_a, got_b = (
                await client.hgetall(store.layout.user_key("a")),
                await client.hgetall(store.layout.user_key("b")),
            )
            assert got_a == got_b
            ttl_a = await client.pexpiretime(store.layout.user_key("a"))
            assert ttl_a == await client.pexpiretime(store.layout.user_key("b"))
        finally:
            keys = [k async for k in client.scan_iter(match=f"{ns}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(go())


# --- the defect of issue 14, at the store -------------------------------------------------------
@pytest.mark.parametrize("order", ["purchase first", "follow first"])
async def test_a_purchase_before_the_follow_is_known_is_not_lost(
    aredis: aioredis.Redis, namespace: str, order: str
) -> None:
    t = _start_ms()
    store = MembershipStore(aredis, MembershipLayout(namespace), ManualClock(t))
    ttls = Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
    purchase = derive.purchase("u", "S", t - 60_000, ttls)
    follow = derive.follow("u", "S", t - 120_000, ttls)
    for w in [purchase, follow] if order == "purchase first" else [follow, purchase]:
        assert (await store.apply(w)).applied == 1
    keys = await store.member_keys(
        "u", [("S", CrowdKind.PURCHASED_FANS), ("S", CrowdKind.ALL_FANS)]
    )
    assert keys == {("S", CrowdKind.PURCHASED_FANS), ("S", CrowdKind.ALL_FANS)}
