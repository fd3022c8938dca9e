"""Model-based proof of the membership store against the real Redis.

A plain-Python model of last-writer-wins-by-fact-time (:class:`Model`) is driven side by side
with :class:`MembershipStore` by a hypothesis state machine that interleaves follows, unfollows,
purchases (delivered, lost, duplicated, out of order), snapshots cut at any time and loaded late
or twice, and a clock running past the TTLs. After every step the store must equal the model,
and - independently of the model - an all_fans membership must equal the greatest live fact
delivered about it (so a snapshot cut before an unfollow can never bring the relation back).
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

from pricing_service.domain import Crowd, CrowdKind, ManualClock
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite, Ttls
from pricing_service.membership.layout import MembershipLayout, Record
from pricing_service.membership.store import ApplyResult, MembershipStore

pytestmark = pytest.mark.integration

TICK = 10_000
TTLS = Ttls(membership_ms=60_000, tombstone_ms=90_000, old_fan_min_ms=30_000)
USERS = ("u1", "42", "b{r}ace")  # a numeric id and one with braces in it
SELLERS = ("7", "0042", "shop-x")  # canonical numeric, leading zero, not numeric
CROWDS = tuple(Crowd(s, k) for s in SELLERS for k in CrowdKind)


def _start_ms() -> int:
    """A manual clock start ahead of the real clock (key PEXPIREAT uses Redis's real time)."""
    return (time.time_ns() // 1_000_000 // 1000 + 600) * 1000


# --- the model ------------------------------------------------------------------------------
def stored_expiry(w: MembershipWrite) -> int:
    """The layout keeps whole seconds after the version, rounded up."""
    return w.version_ms + (max(0, w.expires_ms - w.version_ms) + 999) // 1000 * 1000


def order_key(r: Record) -> tuple[int, bool, int]:
    return (r.version_ms, r.tombstone, r.expires_ms)


@dataclass
class Model:
    """Last writer wins by (version, tombstone, expiry), per (user, crowd) record."""

    recs: dict[tuple[str, Crowd], Record] = field(default_factory=dict)

    def _live_member(self, user: str, crowd: Crowd, now: int) -> bool:
        r = self.recs.get((user, crowd))
        return r is not None and not r.tombstone and r.expires_ms > now

    def apply(self, writes: list[MembershipWrite], now: int) -> None:
        for w in writes:
            for key in [k for k, r in self.recs.items() if k[0] == w.user_id]:
                if self.recs[key].expires_ms <= now:
                    del self.recs[key]
            if w.requires is not None and not self._live_member(w.user_id, w.requires, now):
                continue
            new = Record(w.tombstone, w.version_ms, stored_expiry(w))
            old = self.recs.get((w.user_id, w.crowd))
            if old is None or order_key(new) > order_key(old):
                if new.expires_ms <= now:
                    self.recs.pop((w.user_id, w.crowd), None)
                else:
                    self.recs[(w.user_id, w.crowd)] = new

    def members(self, user: str, now: int) -> frozenset[Crowd]:
        return frozenset(
            c
            for c in CROWDS
            if self._live_member(user, c, now)
            and (
                c.kind == CrowdKind.ALL_FANS
                or self._live_member(user, Crowd(c.seller_id, CrowdKind.ALL_FANS), now)
            )
        )


@dataclass(frozen=True)
class Fact:
    """Something that happened in the source systems (follow graph, orders)."""

    kind: str  # follow | unfollow | purchase
    user: str
    seller: str
    at_ms: int


def snapshot_rows(facts: list[Fact], cut_ms: int) -> list[tuple[str, str, int, int]]:
    """What the T+1 export cut at ``cut_ms`` would contain: (user, seller, followed_at, purchases)."""
    rows = []
    for user in USERS:
        for seller in SELLERS:
            mine = sorted(
                (f for f in facts if f.user == user and f.seller == seller and f.at_ms <= cut_ms),
                key=lambda f: (f.at_ms, f.kind == "unfollow"),
            )
            following_since: int | None = None
            purchases = 0
            for f in mine:
                if f.kind == "follow" and following_since is None:
                    following_since = f.at_ms
                elif f.kind == "unfollow":
                    following_since = None
                elif f.kind == "purchase":
                    purchases += 1
            if following_since is not None:
                rows.append((user, seller, following_since, purchases))
    return rows


# --- the state machine ----------------------------------------------------------------------
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
        self.store = MembershipStore(self.redis, self.layout, self.clock)
        self.model = Model()
        self.facts: list[Fact] = []
        self.batches: list[list[MembershipWrite]] = []
        self.snapshots: list[tuple[int, list[tuple[str, str, int, int]]]] = []
        #: every all_fans write delivered, for the model-free no-resurrection check
        self.all_fans_log: dict[tuple[str, str], list[Record]] = {}
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

    def version(self, dt_ticks: int, jitter: int) -> int:
        tick = (self.now - self.t0) // TICK + dt_ticks
        return max(self.t0 + tick * TICK + jitter, self.t0 - 20 * TICK)

    def deliver(self, writes: list[MembershipWrite]) -> None:
        self.record(writes, self.run(self.store.apply(writes)))

    def record(self, writes: list[MembershipWrite], result: ApplyResult) -> None:
        """Check an applied batch's counts and apply the same writes to the model."""
        assert not result.failed_users
        assert result.applied + result.stale + result.condition_unmet == len(writes)
        self.model.apply(writes, self.now)
        for w in writes:
            if w.crowd.kind == CrowdKind.ALL_FANS:
                self.all_fans_log.setdefault((w.user_id, w.crowd.seller_id), []).append(
                    Record(w.tombstone, w.version_ms, stored_expiry(w))
                )

    @initialize()
    def load_script(self) -> None:
        self.run(self.store.load_script())

    def pick_time(self, data: st.DataObject, dt: int, jitter: int) -> int:
        """A fresh time near the clock, or (often) one already used: equal versions collide."""
        reuse: bool = bool(self.seen) and data.draw(st.booleans(), label="reuse time")
        if reuse:
            return data.draw(st.sampled_from(sorted(self.seen)), label="time")
        at = self.version(dt, jitter)
        self.seen.add(at)
        return at

    @rule(
        kind=st.sampled_from(["follow", "unfollow", "purchase"]),
        user=st.sampled_from(USERS),
        seller=st.sampled_from(SELLERS),
        dt=st.integers(-9, 1),
        jitter=st.sampled_from([0, 0, 1]),
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
        self.facts.append(Fact(kind, user, seller, at))
        if not delivered:
            return
        writes = getattr(derive, kind)(user, seller, at, TTLS)
        self.batches.append(writes)
        self.deliver(writes)

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """At-least-once delivery: an earlier batch arrives again."""
        self.deliver(data.draw(st.sampled_from(self.batches), label="batch"))

    @rule(dt=st.integers(-9, 0), data=st.data())
    def cut_snapshot(self, dt: int, data: st.DataObject) -> None:
        """The offline export is cut (its rows are frozen now) but not loaded yet."""
        cut = min(self.pick_time(data, dt, 0), self.now)
        self.snapshots.append((cut, snapshot_rows(self.facts, cut)))

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data(), batch_rows=st.sampled_from([1, 2, 100]), fast=st.booleans())
    def load_snapshot(self, data: st.DataObject, batch_rows: int, fast: bool) -> None:
        """A cut snapshot is loaded, possibly late, possibly twice, in batches of rows: through
        the general write path, or (``fast``) the loader's: SnapshotEncoder's fields with one
        value, APPLY_SAME_VALUE_LUA."""
        cut, rows = data.draw(st.sampled_from(self.snapshots), label="snapshot")
        for i in range(0, len(rows), batch_rows):
            batch = rows[i : i + batch_rows]
            writes = [
                w
                for user, seller, since, purchases in batch
                for w in derive.snapshot_row(user, seller, since, purchases, cut, TTLS)
            ]
            if not fast:
                self.deliver(writes)
                continue
            enc = derive.SnapshotEncoder(cut, TTLS)
            fields: dict[str, list[str]] = {}
            for row in batch:
                enc.add(fields, *row)
            assert enc.value is not None  # cuts are recent
            result = self.run(self.store.apply_same_value(fields, enc.value))
            self.record(writes, result)

    @rule(ms=st.sampled_from([1, 999, 1000, TICK, 3 * TICK, 6 * TICK, 9 * TICK]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @precondition(lambda self: bool(self.model.recs))
    @rule(data=st.data(), offset=st.sampled_from([-1, 0, 1]))
    def advance_to_an_expiry(self, data: st.DataObject, offset: int) -> None:
        """Put the clock exactly on (or 1 ms around) a record's expiry: the boundary cases."""
        expiries = sorted({r.expires_ms + offset for r in self.model.recs.values()})
        target = data.draw(st.sampled_from(expiries), label="expiry")
        if target > self.now:
            self.clock.advance(target - self.now)

    @invariant()
    def store_equals_model(self) -> None:
        now = self.now
        for user in USERS:
            members = self.run(self.store.member_crowds(user, CROWDS))
            assert members == self.model.members(user, now), user
            # The model purges exactly when the script does (on each write to the buyer), so
            # the whole hash - expired leftovers included - must equal it, field for field.
            want = {c: r for (u, c), r in self.model.recs.items() if u == user}
            assert self.run(self.store.all_records(user)) == want, user
            records = self.run(self.store.records(user, CROWDS))
            assert records == {c: want.get(c) for c in CROWDS}, user
            key = self.layout.user_key(user)
            expire_at = self.run(self.redis.pexpiretime(key))
            if want:  # the key lives exactly as long as its latest record
                assert expire_at == max(r.expires_ms for r in want.values()), user
            else:
                assert expire_at == -2, (user, expire_at)  # no records => no key at all
        assert not self.store.anomaly_counts.keys() - {"no_record"}

    @invariant()
    def all_fans_is_the_greatest_live_fact(self) -> None:
        """Model-free: all_fans membership = the greatest live all_fans fact is a follow."""
        now = self.now
        for user in USERS:
            members = self.run(
                self.store.member_crowds(
                    user, [Crowd(s, CrowdKind.ALL_FANS) for s in SELLERS], now_ms=now
                )
            )
            for seller in SELLERS:
                live = [r for r in self.all_fans_log.get((user, seller), []) if r.expires_ms > now]
                top = max(live, key=order_key, default=None)
                expected = top is not None and not top.tombstone
                assert (Crowd(seller, CrowdKind.ALL_FANS) in members) == expected, (user, seller)


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
_W_CROWDS = (
    Crowd("7", CrowdKind.ALL_FANS),
    Crowd("7", CrowdKind.OLD_FANS),
    Crowd("x", CrowdKind.ALL_FANS),
)


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            st.sampled_from(_W_CROWDS),
            st.integers(0, 3),  # version: few values, so ties are common
            st.booleans(),  # tombstone
            st.sampled_from([60_000, 60_001, 61_000, 90_000]),  # ttl: config may differ
        ),
        min_size=1,
        max_size=12,
    ),
    order=st.randoms(use_true_random=False),
)
def test_unconditional_writes_commute(redis_url: str, raw: list[Any], order: Any) -> None:
    """Any arrival order (and any replay) of live writes ends in the same hash, field for field."""
    t0 = _start_ms()
    ns = f"test:comm:{uuid.uuid4().hex[:12]}:"

    def writes(user: str) -> list[MembershipWrite]:
        return [
            MembershipWrite(user, c, tomb, t0 + v * 1000, t0 + v * 1000 + ttl)
            for c, v, tomb, ttl in raw
        ]

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
        store = MembershipStore(client, MembershipLayout(ns), ManualClock(t0))
        try:
            shuffled = writes("b")
            order.shuffle(shuffled)
            await store.apply(writes("a"))
            for i in range(0, len(shuffled), 3):  # several calls, and one replayed
                await store.apply(shuffled[i : i + 3])
            await store.apply(shuffled[:2])
            got_a, got_b = await store.all_records("a"), await store.all_records("b")
            assert got_a == got_b
            expected = Model()
            expected.apply(writes("a"), t0)
            assert got_a == {c: r for (_, c), r in expected.recs.items()}
            ttl_a = await client.pexpiretime(store.layout.user_key("a"))
            assert ttl_a == await client.pexpiretime(store.layout.user_key("b"))
        finally:
            keys = [k async for k in client.scan_iter(match=f"{ns}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(go())


# --- concurrency ------------------------------------------------------------------------------
async def test_snapshot_load_and_event_stream_concurrently_converge(
    redis_url: str, namespace: str
) -> None:
    """A snapshot loader and two event consumers write the same buyers at the same time (three
    connections, pipelined batches interleaving in Redis); the end state equals the model."""
    rnd = random.Random(1234)
    t0 = _start_ms()
    clock = ManualClock(t0)
    ttls = Ttls(membership_ms=3_600_000, tombstone_ms=7_200_000, old_fan_min_ms=600_000)
    users = [f"u{i}" for i in range(80)]
    sellers = [str(s) for s in (7, 42, 1000, 99_999)] + ["shop-a", "0012"]
    cut = t0 - 300_000

    rows = [
        (u, s, cut - rnd.choice([0, 60_000, 3_600_000]), rnd.choice([0, 0, 1, 3]))
        for u in users
        for s in sellers
        if rnd.random() < 0.6
    ]
    snapshot = [w for r in rows for w in derive.snapshot_row(*r, cut, ttls)]
    events: list[MembershipWrite] = []
    for _ in range(1500):
        kind = rnd.choice([derive.follow, derive.unfollow])
        # around the cut on both sides: older events lose to the snapshot, newer ones win,
        # and many share the cut's exact time (the tombstone must win those ties)
        at = cut + rnd.choice([-120_000, -1, 0, 0, 1, 60_000, 120_000, 240_000])
        events.extend(kind(rnd.choice(users), rnd.choice(sellers), at, ttls))
    stream_a, stream_b = events[::2], events[1::2] + events[:300]  # plus redeliveries

    clients = [aioredis.Redis.from_url(redis_url, socket_timeout=10) for _ in range(3)]
    layout = MembershipLayout(namespace)
    stores = [MembershipStore(c, layout, clock) for c in clients]

    done: list[int] = []  # which feeder finished each call, in completion order

    async def feed(who: int, writes: list[MembershipWrite], batch: int) -> None:
        for i in range(0, len(writes), batch):
            result = await stores[who].apply(writes[i : i + batch])
            assert not result.failed_users
            done.append(who)

    try:
        await asyncio.gather(feed(0, snapshot, 20), feed(1, stream_a, 3), feed(2, stream_b, 5))
        first, last = done.index(0), len(done) - 1 - done[::-1].index(0)
        between = set(done[first:last])
        assert {1, 2} <= between, "the snapshot load did not overlap both event streams"

        model = Model()
        model.apply(snapshot + events, clock.now_ms())
        shuffled = snapshot + events
        rnd.shuffle(shuffled)
        other = Model()
        other.apply(shuffled, clock.now_ms())
        assert other.recs == model.recs  # the model itself is order-independent here
        assert any(r.tombstone for r in model.recs.values())
        assert any(not r.tombstone for r in model.recs.values())

        for user in users:
            want = {c: r for (u, c), r in model.recs.items() if u == user}
            assert await stores[0].all_records(user) == want, user
            crowds = [Crowd(s, k) for s in sellers for k in CrowdKind]
            members = await stores[0].member_crowds(user, crowds)
            live = {c for c, r in want.items() if not r.tombstone}
            assert members == {c for c in live if Crowd(c.seller_id, CrowdKind.ALL_FANS) in live}, (
                user
            )
    finally:
        for c in clients:
            await c.aclose()
