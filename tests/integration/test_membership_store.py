"""The membership store's edges against real Redis: the Lua script, reads that meet bad data,
NOSCRIPT recovery, unreachable Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from pricing_service.crowds import CrowdDef
from pricing_service.domain import Crowd, CrowdKey, CrowdKind, ManualClock
from pricing_service.membership import derive
from pricing_service.membership.derive import FactWrite, MembershipWrite, Ttls
from pricing_service.membership.layout import EPOCH_MS, Facts, Follow, MembershipLayout, Purchases
from pricing_service.membership.store import MembershipStore
from pricing_service.metrics import Metrics
from pricing_testing.redis_server import RedisServer

pytestmark = pytest.mark.integration

ALL, OLD, PUR = CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS
TTLS = Ttls(membership_ms=60_000, tombstone_ms=90_000, old_fan_min_ms=30_000)


def start_ms() -> int:
    return (time.time_ns() // 1_000_000 // 1000 + 600) * 1000  # ahead of Redis's real clock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_ms())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def store(
    aredis: aioredis.Redis, namespace: str, clock: ManualClock, metrics: Metrics
) -> AsyncIterator[MembershipStore]:
    yield MembershipStore(aredis, MembershipLayout(namespace), clock, metrics)


def w(
    user: str, seller: str, version: int, *, tomb: bool = False, ttl: int = 60_000, since: int = 0
) -> MembershipWrite:
    """A follow (since ``since`` or its own time) or an unfollow of ``seller``."""
    return FactWrite(
        user,
        seller,
        Facts(Follow(version, tomb, version + ttl, 0 if tomb else since or version)),
    )


async def follow_of(store: MembershipStore, user: str, seller: str) -> Follow | None:
    facts = (await store.all_fields(user)).get(("facts", seller))
    return facts.follow if facts is not None else None


def anomaly(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "pricing_membership_read_anomalies_total", {"reason": reason}
    )
    return value or 0.0


# --- the follow: last writer wins by the time of the fact -----------------------------------------
async def test_newer_wins_older_is_stale(store: MembershipStore, clock: ManualClock) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    assert (await store.apply([w("u", "7", t)])).applied == 1
    r = await store.apply([w("u", "7", t - 1, tomb=True)])
    assert (r.applied, r.stale) == (0, 1)
    assert await store.member_crowds("u", [c]) == {c}
    assert (await store.apply([w("u", "7", t + 1, tomb=True)])).applied == 1
    assert await store.member_crowds("u", [c]) == frozenset()


@pytest.mark.parametrize("tomb_first", [True, False])
async def test_equal_versions_tombstone_wins(
    store: MembershipStore, clock: ManualClock, tomb_first: bool
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    member, tomb = w("u", "7", t), w("u", "7", t, tomb=True, ttl=90_000)
    first, second = (tomb, member) if tomb_first else (member, tomb)
    await store.apply([first])
    r = await store.apply([second])
    assert r.applied == (0 if tomb_first else 1)
    assert await follow_of(store, "u", "7") == Follow(t, True, t + 90_000)
    assert await store.member_crowds("u", [c]) == frozenset()
    # an exact replay changes nothing
    assert (await store.apply([first, second])).applied == 0


async def test_equal_version_and_state_later_expiry_then_later_start_wins(
    store: MembershipStore, clock: ManualClock
) -> None:
    t = clock.now_ms()
    await store.apply([w("u", "7", t, ttl=70_000, since=t - 5000)])
    assert (await store.apply([w("u", "7", t, ttl=60_000)])).stale == 1
    assert (await store.apply([w("u", "7", t, ttl=70_000, since=t - 9000)])).stale == 1
    assert (await store.apply([w("u", "7", t, ttl=70_000, since=t - 2000)])).applied == 1
    assert await follow_of(store, "u", "7") == Follow(t, False, t + 70_000, t - 2000)


async def test_seed_race_snapshot_cut_before_unfollow_loaded_after(
    store: MembershipStore, clock: ManualClock
) -> None:
    """The seed's bug: a snapshot cut at T0 listing a relation, an unfollow at T1 > T0, and the
    snapshot loaded after the unfollow - the relation must stay gone."""
    t0 = clock.now_ms()
    await store.apply(derive.follow("u", "42", t0 - 40_000, TTLS))
    crowds = [Crowd("42", k) for k in (ALL, OLD, PUR)]
    snapshot = derive.snapshot_row("u", "42", t0 - 40_000, 2, t0, TTLS)  # cut at T0
    clock.advance(5_000)
    await store.apply(derive.unfollow("u", "42", t0 + 5_000, TTLS))  # T1
    clock.advance(5_000)
    result = await store.apply(snapshot)  # loaded late: its purchases still count
    assert result.applied == 1
    assert await store.member_crowds("u", crowds) == frozenset()
    # still gone once the membership TTL has passed but the tombstone is still live
    clock.advance(60_000)
    assert (await store.apply(snapshot)).applied == 0
    assert await store.member_crowds("u", crowds) == frozenset()
    # a later follow brings all_fans back (the snapshot's purchases have lapsed meanwhile)
    await store.apply(derive.follow("u", "42", clock.now_ms(), TTLS))
    assert await store.member_crowds("u", crowds) == {Crowd("42", ALL)}


# --- purchases: recorded whatever the follow state, merged by maxima --------------------------
async def test_a_purchase_is_recorded_without_a_follow_and_counts_once_one_follows(
    store: MembershipStore, clock: ManualClock
) -> None:
    t, pur = clock.now_ms(), Crowd("9", PUR)
    assert (await store.apply(derive.purchase("u", "9", t, TTLS))).applied == 1
    assert await store.member_crowds("u", [pur]) == frozenset()  # bought, but not a fan
    await store.apply(derive.follow("u", "9", t - 1000, TTLS))  # the follow arrives after
    assert await store.member_crowds("u", [pur]) == {pur}
    await store.apply(derive.unfollow("u", "9", t + 2, TTLS))
    assert await store.member_crowds("u", [pur]) == frozenset()
    await store.apply(derive.follow("u", "9", t + 3, TTLS))  # the purchase is still known
    assert await store.member_crowds("u", [pur]) == {pur}


async def test_counts_and_times_only_grow(store: MembershipStore, clock: ManualClock) -> None:
    t = clock.now_ms()
    await store.apply(derive.snapshot_row("u", "9", t - 5000, 4, t, TTLS, t - 3000))
    await store.apply(derive.purchase("u", "9", t - 1000, TTLS))  # a later purchase: time
    await store.apply(derive.snapshot_row("u", "9", t - 5000, 2, t - 100, TTLS))  # older: count
    facts = (await store.all_fields("u"))[("facts", "9")]
    assert facts.purchases == Purchases(t + 60_000, 4, t - 1000)
    r = await store.apply(derive.purchase("u", "9", t - 1000, TTLS))  # a redelivery
    assert r.stale == 1  # never counted twice


# --- lists ------------------------------------------------------------------------------------------
async def test_list_entries_newest_change_wins_and_adds_never_expire(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    vip = CrowdDef("7", "vip", None, list_handle=3)
    key: CrowdKey = ("7", "vip")
    resolve: dict[CrowdKey, CrowdDef] = {key: vip}
    add = derive.list_change("u", 3, t, removed=False, ttls=TTLS)
    remove = derive.list_change("u", 3, t + 1, removed=True, ttls=TTLS)
    await store.apply([remove, add])  # any order
    assert await store.member_keys("u", [key], resolve=resolve) == frozenset()
    await store.apply([derive.list_change("u", 3, t + 1, removed=False, ttls=TTLS)])  # a tie
    assert await store.member_keys("u", [key], resolve=resolve) == frozenset()  # removal wins
    await store.apply([derive.list_change("u", 3, t + 2, removed=False, ttls=TTLS)])
    assert await store.member_keys("u", [key], resolve=resolve) == {key}
    assert await aredis.pexpiretime(store.layout.user_key("u")) == -1  # an add keeps the key
    clock.advance(10**9)
    assert await store.member_keys("u", [key], resolve=resolve) == {key}
    # a removal is a tombstone: the key expires with it
    await store.apply([derive.list_change("u", 3, clock.now_ms(), removed=True, ttls=TTLS)])
    assert await aredis.pexpiretime(store.layout.user_key("u")) == clock.now_ms() + 90_000


async def test_crowds_a_server_does_not_know_have_no_members(store: MembershipStore) -> None:
    reasons: dict[CrowdKey, str] = {}
    keys: list[CrowdKey] = [("7", "ghost"), ("7", CrowdKind.SELLER_DEFINED)]
    assert await store.member_keys("u", keys, reasons=reasons) == frozenset()
    assert "not a crowd this server knows" in reasons[("7", "ghost")]


# --- expiry -------------------------------------------------------------------------------------
async def test_expiry_boundary_is_exclusive_to_the_millisecond(
    store: MembershipStore, clock: ManualClock
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    await store.apply([w("u", "7", t, ttl=1_500)])  # stored as the next whole second
    exp = -(-(t + 1_500) // 1000) * 1000
    assert await follow_of(store, "u", "7") == Follow(t, False, exp, t)
    assert await store.member_crowds("u", [c], now_ms=exp - 1) == {c}
    assert await store.member_crowds("u", [c], now_ms=exp) == frozenset()
    # the same stored value, decoded once and memoised, still expires by the time of the read
    assert await store.member_keys("u", [("7", ALL)], now_ms=exp - 1) == {("7", ALL)}
    assert await store.member_keys("u", [("7", ALL)], now_ms=exp) == frozenset()
    clock.advance(exp - 1 - t)
    await store.apply([w("u", "8", t)])  # a write just before the expiry keeps it
    assert await follow_of(store, "u", "7") is not None
    clock.advance(1)
    await store.apply([w("u", "8", t)])  # a write at the expiry purges it
    assert await follow_of(store, "u", "7") is None


async def test_all_fields_expired_deletes_the_key(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await store.apply([w("u", "1", t), w("u", "2", t, ttl=5_000)])
    assert await aredis.hlen(key) == 2
    clock.advance(60_000)
    r = await store.apply([w("u", "1", t - 1)])  # stale, but the call cleans up
    assert r.stale == 1
    assert await aredis.exists(key) == 0
    # a winning write that is already expired leaves no record behind either
    await store.apply([w("u2", "1", t - 60_000)])
    assert await aredis.exists(store.layout.user_key("u2")) == 0


async def test_an_expired_part_is_dropped_and_the_other_kept(
    store: MembershipStore, clock: ManualClock
) -> None:
    t = clock.now_ms()
    await store.apply(
        derive.purchase("u", "1", t - 30_000, TTLS) + derive.follow("u", "1", t, TTLS)
    )
    clock.advance(40_000)  # the purchase part (t - 30 s + 60 s) has lapsed, the follow not
    await store.apply([w("u", "2", t)])
    assert (await store.all_fields("u"))[("facts", "1")] == Facts(Follow(t, False, t + 60_000, t))


async def test_key_expiry_follows_the_latest_part(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await store.apply([w("u", "1", t, ttl=90_000)])
    assert await aredis.pexpiretime(key) == t + 90_000
    await store.apply([w("u", "2", t, ttl=30_000)])  # shorter: key keeps the later
    assert await aredis.pexpiretime(key) == t + 90_000
    await store.apply([w("u", "2", t + 1000, ttl=200_000)])  # longer: key extended
    assert await aredis.pexpiretime(key) == t + 1000 + 200_000


async def test_versions_before_the_layout_epoch_are_stale(store: MembershipStore) -> None:
    r = await store.apply([w("u", "1", EPOCH_MS), w("u", "1", 1000)])
    assert (r.applied, r.stale) == (0, 2)
    assert await store.all_fields("u") == {}


# --- ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seller", "field"),
    [
        ("42", b"168"),
        ("0042", b"f0042"),
        ("999999999999999", b"3999999999999996"),
        ("123456789012345678901234567890", b"f123456789012345678901234567890"),
        ("shop x/\u5e97", "fshop x/\u5e97".encode()),
        ("a1", b"fa1"),
    ],
)
@pytest.mark.parametrize("user", ["u1", "{x}", "a}b{c", "\u7528\u6237:1", ""])
async def test_odd_ids(
    store: MembershipStore,
    clock: ManualClock,
    aredis: aioredis.Redis,
    seller: str,
    field: bytes,
    user: str,
) -> None:
    t = clock.now_ms()
    await store.apply(derive.follow(user, seller, t, TTLS))
    raw = await aredis.hgetall(store.layout.user_key(user))
    assert list(raw) == [field]
    others = [Crowd(seller + "0", ALL), Crowd("0" + seller, ALL), Crowd(seller, OLD)]
    assert await store.member_crowds(user, [Crowd(seller, ALL), *others]) == {Crowd(seller, ALL)}
    assert await store.all_fields(user) == {
        ("facts", seller): Facts(Follow(t, False, t + 60_000, t))
    }


async def test_one_pipeline_many_buyers(store: MembershipStore, clock: ManualClock) -> None:
    t = clock.now_ms()
    writes = [x for i in range(300) for x in derive.follow(f"u{i}", str(i % 7 + 1), t, TTLS)]
    writes += derive.unfollow("u3", "4", t + 1, TTLS)
    r = await store.apply(writes)
    assert (r.applied, r.stale, r.failed_users) == (301, 0, {})
    assert await store.member_crowds("u3", [Crowd("4", ALL)]) == frozenset()
    assert await store.member_crowds("u4", [Crowd("5", ALL)]) == {Crowd("5", ALL)}


# --- reads that meet bad data -------------------------------------------------------------------
async def test_missing_key_reads_not_a_member_and_is_counted(
    store: MembershipStore, metrics: Metrics
) -> None:
    assert await store.member_crowds("nobody", [Crowd("1", ALL), Crowd("1", OLD)]) == frozenset()
    assert await store.facts("nobody", ["1"]) == {"1": None}
    assert store.anomaly_counts["no_record"] == 2
    assert anomaly(metrics, "no_record") == 2
    assert await store.member_crowds("nobody", []) == frozenset()  # no crowds: no query at all
    assert store.anomaly_counts["no_record"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"garbage",
        b"",
        b"\x01" + b"\x00" * 12,  # a follow part one byte short
        b"\x08" + b"\x00" * 13,  # an unknown flag
        b"\x01\x00\x00\x00\x01" + b"\x00" * 9,  # version 0
        b"1234567890123",
        b"\xff\xfe\x00",
    ],
)
async def test_corrupt_value_reads_not_a_member_is_counted_and_dropped_on_next_write(
    store: MembershipStore,
    clock: ManualClock,
    aredis: aioredis.Redis,
    metrics: Metrics,
    bad: bytes,
) -> None:
    t, c, other = clock.now_ms(), Crowd("7", ALL), Crowd("8", ALL)
    key = store.layout.user_key("u")
    await store.apply([w("u", "8", t)])
    await aredis.hset(key, store.layout.fact_field("7"), bad)
    assert await store.member_crowds("u", [c, other]) == {other}
    assert store.anomaly_counts["corrupt_value"] == 1
    assert anomaly(metrics, "corrupt_value") == 1
    # decoded values are memoised, corrupt ones are not: every read of it is counted
    assert await store.member_keys("u", [("7", ALL), ("8", ALL)]) == {("8", ALL)}
    assert anomaly(metrics, "corrupt_value") == 2
    assert (await store.facts("u", ["7"]))["7"] is None
    # the script agrees it is corrupt: dropped by the next write to the buyer, which then applies
    # even with an old version (a corrupt value protects nothing)
    r = await store.apply([w("u", "7", t - 1000)])
    assert r.applied == 1
    assert await store.member_crowds("u", [c]) == {c}
    assert (await aredis.hget(key, store.layout.fact_field("7"))) != bad


async def test_a_corrupt_list_entry_reads_not_on_the_list(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    key: CrowdKey = ("7", "vip")
    resolve: dict[CrowdKey, CrowdDef] = {key: CrowdDef("7", "vip", None, list_handle=4)}
    await aredis.hset(store.layout.user_key("u"), store.layout.list_field(4), b"not a number")
    assert await store.member_keys("u", [key], resolve=resolve) == frozenset()
    assert store.anomaly_counts["corrupt_value"] == 1


async def test_corrupt_field_name_is_dropped_by_the_next_write(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await aredis.hset(key, "not-a-field", "12345")
    assert await store.all_fields("u") == {}
    assert store.anomaly_counts["corrupt_value"] == 1
    await store.apply([w("u", "7", t)])
    assert await aredis.hkeys(key) == [b"28"]


async def test_wrong_type_key_reads_not_a_member_and_writes_fail_alone(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis, metrics: Metrics
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    await aredis.set(store.layout.user_key("u"), "a string")
    assert await store.member_crowds("u", [c]) == frozenset()
    assert await store.facts("u", ["7"]) == {"7": None}
    assert store.anomaly_counts["wrong_type"] == 2
    assert anomaly(metrics, "wrong_type") == 2
    r = await store.apply([w("u", "7", t), w("v", "7", t)])
    assert r.applied == 1 and list(r.failed_users) == ["u"]
    assert "WRONGTYPE" in r.failed_users["u"]
    assert await aredis.get(store.layout.user_key("u")) == b"a string"  # left alone
    assert await store.member_crowds("v", [c]) == {c}


async def test_unreachable_redis_is_not_swallowed(private_redis: RedisServer) -> None:
    """The serving path, not the store, decides to degrade (search) or refuse (checkout)."""
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=2)
    store = MembershipStore(client, MembershipLayout("t:"), ManualClock(start_ms()))
    try:
        c = Crowd("7", ALL)
        await store.apply(derive.follow("u", "7", store.clock.now_ms(), TTLS))
        assert await store.member_crowds("u", [c]) == {c}
        private_redis.kill()
        with pytest.raises(RedisConnectionError):
            await store.member_crowds("u", [c])
        with pytest.raises(RedisConnectionError):
            await store.apply(derive.follow("u", "7", store.clock.now_ms(), TTLS))
        assert not store.anomaly_counts  # an outage is not a data anomaly
    finally:
        await client.aclose()


# --- NOSCRIPT ---------------------------------------------------------------------------------
async def test_script_flush_and_restart_are_recovered(private_redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=2)
    clock = ManualClock(start_ms())
    store = MembershipStore(client, MembershipLayout("t:"), clock)
    try:
        t = clock.now_ms()
        assert (await store.apply(derive.follow("u", "1", t, TTLS))).applied == 1
        sha = store._sha
        assert sha is not None and (await client.script_exists(sha)) == [True]
        await client.script_flush()
        r = await store.apply(derive.follow("u", "2", t, TTLS) + derive.follow("v", "2", t, TTLS))
        assert (r.applied, r.failed_users) == (2, {})
        assert (await client.script_exists(sha)) == [True]
        await client.aclose()

        private_redis.restart()  # empty, no scripts; the client reconnects
        client = aioredis.Redis.from_url(private_redis.url, socket_timeout=2)
        store.redis = client
        r = await store.apply(derive.follow("u", "3", t, TTLS))
        assert (r.applied, r.failed_users) == (1, {})
        assert await store.member_crowds("u", [Crowd("3", ALL), Crowd("1", ALL)]) == {
            Crowd("3", ALL)
        }
    finally:
        await client.aclose()
