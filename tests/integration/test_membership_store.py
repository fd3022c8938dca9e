"""The membership store's edges against real Redis: the Lua script, reads that meet bad data,
NOSCRIPT recovery, unreachable Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from pricing_service.domain import Crowd, CrowdKind, ManualClock
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite, Ttls
from pricing_service.membership.layout import EPOCH_MS, MembershipLayout, Record
from pricing_service.membership.store import MembershipStore
from pricing_service.metrics import Metrics
from tests.support.redis_server import RedisServer

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
    user: str, crowd: Crowd, version: int, *, tomb: bool = False, ttl: int = 60_000
) -> MembershipWrite:
    return MembershipWrite(user, crowd, tomb, version, version + ttl)


def anomaly(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "pricing_membership_read_anomalies_total", {"reason": reason}
    )
    return value or 0.0


# --- last writer wins ---------------------------------------------------------------------------
async def test_newer_wins_older_is_stale(store: MembershipStore, clock: ManualClock) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    assert (await store.apply([w("u", c, t)])).applied == 1
    r = await store.apply([w("u", c, t - 1, tomb=True)])
    assert (r.applied, r.stale) == (0, 1)
    assert await store.member_crowds("u", [c]) == {c}
    assert (await store.apply([w("u", c, t + 1, tomb=True)])).applied == 1
    assert await store.member_crowds("u", [c]) == frozenset()


@pytest.mark.parametrize("tomb_first", [True, False])
async def test_equal_versions_tombstone_wins(
    store: MembershipStore, clock: ManualClock, tomb_first: bool
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    member, tomb = w("u", c, t), w("u", c, t, tomb=True, ttl=90_000)
    first, second = (tomb, member) if tomb_first else (member, tomb)
    await store.apply([first])
    r = await store.apply([second])
    assert r.applied == (0 if tomb_first else 1)
    assert (await store.records("u", [c]))[c] == Record(True, t, t + 90_000)
    assert await store.member_crowds("u", [c]) == frozenset()
    # an exact replay changes nothing
    assert (await store.apply([first, second])).applied == 0


async def test_equal_version_and_state_later_expiry_wins(
    store: MembershipStore, clock: ManualClock
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    await store.apply([w("u", c, t, ttl=70_000)])
    assert (await store.apply([w("u", c, t, ttl=60_000)])).stale == 1
    assert (await store.records("u", [c]))[c] == Record(False, t, t + 70_000)


async def test_seed_race_snapshot_cut_before_unfollow_loaded_after(
    store: MembershipStore, clock: ManualClock
) -> None:
    """The seed's bug: a snapshot cut at T0 listing a relation, an unfollow at T1 > T0, and the
    snapshot loaded after the unfollow - the relation must stay gone."""
    t0 = clock.now_ms()
    await store.apply(derive.follow("u", "42", t0 - 40_000, TTLS))
    assert await store.member_crowds("u", [Crowd("42", ALL)]) == {Crowd("42", ALL)}
    snapshot = derive.snapshot_row("u", "42", t0 - 40_000, 2, t0, TTLS)  # cut at T0
    assert {x.crowd.kind for x in snapshot} == {ALL, OLD, PUR}
    clock.advance(5_000)
    await store.apply(derive.unfollow("u", "42", t0 + 5_000, TTLS))  # T1
    clock.advance(5_000)
    result = await store.apply(snapshot)  # loaded late
    assert (result.applied, result.stale) == (0, 3)
    crowds = [Crowd("42", k) for k in CrowdKind]
    assert await store.member_crowds("u", crowds) == frozenset()
    # still gone once the membership TTL has passed but the tombstone is still live
    clock.advance(60_000)
    assert (await store.apply(snapshot)).applied == 0
    assert await store.member_crowds("u", crowds) == frozenset()
    # a later follow brings it back (all_fans only: old/purchased need the next snapshot)
    await store.apply(derive.follow("u", "42", clock.now_ms(), TTLS))
    assert await store.member_crowds("u", crowds) == {Crowd("42", ALL)}


# --- conditions ---------------------------------------------------------------------------------
async def test_purchase_needs_a_live_current_follow(
    store: MembershipStore, clock: ManualClock
) -> None:
    t, pur = clock.now_ms(), Crowd("9", PUR)
    r = await store.apply(derive.purchase("u", "9", t, TTLS))
    assert (r.applied, r.condition_unmet) == (0, 1)
    assert await store.all_records("u") == {}
    await store.apply(derive.follow("u", "9", t, TTLS))
    assert (await store.apply(derive.purchase("u", "9", t + 1, TTLS))).applied == 1
    assert pur in await store.member_crowds("u", [pur])
    await store.apply(derive.unfollow("u", "9", t + 2, TTLS))
    assert (await store.apply(derive.purchase("u", "9", t + 3, TTLS))).condition_unmet == 1
    # a follow that has expired is no follow either
    await store.apply(derive.follow("v", "9", t, TTLS))
    clock.advance(60_000)
    assert (await store.apply(derive.purchase("v", "9", t + 59_000, TTLS))).condition_unmet == 1


async def test_kinds_other_than_all_fans_need_a_live_all_fans(
    store: MembershipStore, clock: ManualClock
) -> None:
    """old_fans/purchased_fans live but all_fans tombstoned (or missing) => not members."""
    t = clock.now_ms()
    old, pur, base = Crowd("5", OLD), Crowd("5", PUR), Crowd("5", ALL)
    await store.apply([w("u", base, t, tomb=True), w("u", old, t + 1), w("u", pur, t + 1)])
    assert await store.member_crowds("u", [old, pur, base]) == frozenset()
    await store.apply([w("v", old, t), w("v", pur, t)])
    assert await store.member_crowds("v", [old, pur]) == frozenset()
    await store.apply([w("v", base, t)])
    assert await store.member_crowds("v", [old, pur, old]) == {old, pur}


# --- expiry -------------------------------------------------------------------------------------
async def test_expiry_boundary_is_exclusive_to_the_millisecond(
    store: MembershipStore, clock: ManualClock
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    await store.apply([MembershipWrite("u", c, False, t, t + 1_500)])  # stored as t + 2 s
    assert (await store.records("u", [c]))[c] == Record(False, t, t + 2_000)
    assert await store.member_crowds("u", [c], now_ms=t + 1_999) == {c}
    assert await store.member_crowds("u", [c], now_ms=t + 2_000) == frozenset()
    # the same stored value, decoded once and memoised, still expires by the time of the read
    assert await store.member_keys("u", [("7", ALL)], now_ms=t + 1_999) == {("7", ALL)}
    assert await store.member_keys("u", [("7", ALL)], now_ms=t + 2_000) == frozenset()
    clock.advance(1_999)
    other = Crowd("8", ALL)
    await store.apply([w("u", other, t)])  # a write at t+1999 keeps the live record
    assert (await store.records("u", [c]))[c] is not None
    clock.advance(1)
    await store.apply([w("u", other, t)])  # a write at t+2000 purges it
    assert (await store.records("u", [c]))[c] is None


async def test_all_fields_expired_deletes_the_key(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await store.apply([w("u", Crowd("1", ALL), t), w("u", Crowd("2", ALL), t, ttl=5_000)])
    assert await aredis.hlen(key) == 2
    clock.advance(60_000)
    r = await store.apply(derive.purchase("u", "1", t + 60_000, TTLS))  # unmet: no live follow
    assert r.condition_unmet == 1
    assert await aredis.exists(key) == 0
    # a winning write that is already expired leaves no record behind either
    await store.apply([w("u2", Crowd("1", ALL), t - 60_000)])
    assert await aredis.exists(store.layout.user_key("u2")) == 0


async def test_key_expiry_follows_the_latest_field(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await store.apply([w("u", Crowd("1", ALL), t, ttl=90_000)])
    assert await aredis.pexpiretime(key) == t + 90_000
    await store.apply([w("u", Crowd("2", ALL), t, ttl=30_000)])  # shorter: key keeps the later
    assert await aredis.pexpiretime(key) == t + 90_000
    await store.apply([w("u", Crowd("2", ALL), t + 1, ttl=200_000)])  # longer: key extended
    assert await aredis.pexpiretime(key) == t + 1 + 200_000


async def test_versions_before_the_layout_epoch_are_stale(store: MembershipStore) -> None:
    r = await store.apply([w("u", Crowd("1", ALL), EPOCH_MS), w("u", Crowd("1", ALL), 1000)])
    assert (r.applied, r.stale) == (0, 2)
    assert await store.all_records("u") == {}


# --- ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seller", "field"),
    [
        ("42", b"169"),
        ("0042", b"a0042"),
        ("999999999999999", b"3999999999999997"),
        ("123456789012345678901234567890", b"a123456789012345678901234567890"),
        ("shop x/\u5e97", "ashop x/\u5e97".encode()),
        ("a1", b"aa1"),
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
    assert await store.all_records(user) == {Crowd(seller, ALL): Record(False, t, t + 60_000)}


async def test_one_pipeline_many_buyers(store: MembershipStore, clock: ManualClock) -> None:
    t = clock.now_ms()
    writes = [x for i in range(300) for x in derive.follow(f"u{i}", str(i % 7 + 1), t, TTLS)]
    writes += derive.unfollow("u3", "4", t + 1, TTLS)
    r = await store.apply(writes)
    assert (r.applied, r.stale, r.failed_users) == (303, 0, {})
    assert await store.member_crowds("u3", [Crowd("4", ALL)]) == frozenset()
    assert await store.member_crowds("u4", [Crowd("5", ALL)]) == {Crowd("5", ALL)}


# --- reads that meet bad data -------------------------------------------------------------------
async def test_missing_key_reads_not_a_member_and_is_counted(
    store: MembershipStore, metrics: Metrics
) -> None:
    assert await store.member_crowds("nobody", [Crowd("1", ALL), Crowd("1", OLD)]) == frozenset()
    assert await store.records("nobody", [Crowd("1", ALL)]) == {Crowd("1", ALL): None}
    assert store.anomaly_counts["no_record"] == 2
    assert anomaly(metrics, "no_record") == 2
    assert await store.member_crowds("nobody", []) == frozenset()  # no crowds: no query at all
    assert store.anomaly_counts["no_record"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"garbage",
        b"",
        b"1234567",
        b" 12345678901",
        b"0x1234567890",
        b"12345678901.5",
        b"-12345678901",
        b"12345678901234567890",
        b"9223372036854775808",
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
    await store.apply([w("u", other, t)])
    await aredis.hset(key, store.layout.crowd_field(c), bad)
    assert await store.member_crowds("u", [c, other]) == {other}
    assert store.anomaly_counts["corrupt_value"] == 1
    assert anomaly(metrics, "corrupt_value") == 1
    # decoded values are memoised, corrupt ones are not: every read of it is counted
    assert await store.member_keys("u", [("7", ALL), ("8", ALL)]) == {("8", ALL)}
    assert anomaly(metrics, "corrupt_value") == 2
    assert (await store.records("u", [c]))[c] is None
    # the script agrees it is corrupt: dropped by the next write to the buyer, which then applies
    # even with an old version (a corrupt value protects nothing)
    r = await store.apply([w("u", c, t - 1000)])
    assert r.applied == 1
    assert await store.member_crowds("u", [c]) == {c}
    assert (await aredis.hget(key, store.layout.crowd_field(c))) != bad


async def test_corrupt_field_name_is_dropped_by_the_next_write(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis
) -> None:
    t = clock.now_ms()
    key = store.layout.user_key("u")
    await aredis.hset(key, "not-a-field", "12345")
    assert await store.all_records("u") == {}
    assert store.anomaly_counts["corrupt_value"] == 1
    await store.apply([w("u", Crowd("7", ALL), t)])
    assert await aredis.hkeys(key) == [b"29"]


async def test_wrong_type_key_reads_not_a_member_and_writes_fail_alone(
    store: MembershipStore, clock: ManualClock, aredis: aioredis.Redis, metrics: Metrics
) -> None:
    t, c = clock.now_ms(), Crowd("7", ALL)
    await aredis.set(store.layout.user_key("u"), "a string")
    assert await store.member_crowds("u", [c]) == frozenset()
    assert await store.records("u", [c]) == {c: None}
    assert store.anomaly_counts["wrong_type"] == 2
    assert anomaly(metrics, "wrong_type") == 2
    r = await store.apply([w("u", c, t), w("v", c, t)])
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
