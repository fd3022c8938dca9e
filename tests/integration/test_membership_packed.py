"""The standalone write path packs its own EVALSHA pipeline: it must behave exactly like the
redis-py pipeline it replaces (the path Redis Cluster still uses), reply by reply."""

from __future__ import annotations

import random
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.domain import Crowd, CrowdKind, ManualClock
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite, SnapshotEncoder, Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore, group_writes
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

TTLS = Ttls(membership_ms=60_000, tombstone_ms=90_000, old_fan_min_ms=30_000)
SELLERS = ["42", "7", "x-1", "é", "1" * 16, "0"]
USERS = ["u1", "u2", "ü", "a b", "x" * 64, "{}", "0"]


def random_writes(rng: random.Random, t0: int, n: int) -> list[MembershipWrite]:
    out: list[MembershipWrite] = []
    for _ in range(n):
        user, seller = rng.choice(USERS), rng.choice(SELLERS)
        at = t0 + rng.randrange(-5_000, 5_000)
        fact = rng.choice([derive.follow, derive.unfollow, derive.purchase])
        out.extend(fact(user, seller, at, TTLS))
    out.append(MembershipWrite("old", Crowd("1", CrowdKind.ALL_FANS), False, 5, 10))  # stale
    return out


async def state(client: aioredis.Redis, layout: MembershipLayout) -> dict[str, object]:
    out: dict[str, object] = {}
    for user in [*USERS, "wrong"]:
        key = layout.user_key(user)
        kind = await client.type(key)
        if kind == b"hash":
            out[user] = (await client.hgetall(key), await client.pexpiretime(key))
        elif kind != b"none":
            out[user] = kind
    return out


async def test_packed_path_equals_the_redis_py_pipeline(
    aredis: aioredis.Redis, namespace: str
) -> None:
    clock = ManualClock((time.time_ns() // 1_000_000 // 1000 + 600) * 1000)
    packed = MembershipStore(aredis, MembershipLayout(namespace + "p:"), clock)
    piped = MembershipStore(aredis, MembershipLayout(namespace + "q:"), clock)
    piped._send_packed = piped._send_pipeline  # type: ignore[method-assign]  # the reference
    for store in (packed, piped):  # a buyer whose key is not a hash fails alone, every time
        await aredis.set(store.layout.user_key("wrong"), "a string")
    rng = random.Random(3)
    for round_ in range(6):
        writes = random_writes(rng, clock.now_ms(), 60)
        writes.append(MembershipWrite("wrong", Crowd("1", CrowdKind.ALL_FANS), False,
                                      clock.now_ms(), clock.now_ms() + 1000))  # fmt: skip
        a = await packed.apply(writes)
        b = await piped.apply(writes)
        assert (a.applied, a.stale, a.condition_unmet) == (b.applied, b.stale, b.condition_unmet)
        assert a.failed_users.keys() == b.failed_users.keys() == {"wrong"}
        assert "WRONGTYPE" in a.failed_users["wrong"]
        assert a.applied > 0 and a.stale >= 1, round_
        assert await state(aredis, packed.layout) == await state(aredis, piped.layout)
        clock.advance(20_000)  # later rounds also drop expired fields
    assert await state(aredis, packed.layout) != {}


async def test_snapshot_args_apply_like_writes_and_a_replay_is_all_stale(
    aredis: aioredis.Redis, namespace: str
) -> None:
    clock = ManualClock((time.time_ns() // 1_000_000 // 1000 + 600) * 1000)
    cut = clock.now_ms() - 1000
    store = MembershipStore(aredis, MembershipLayout(namespace), clock)
    rows = [(u, s, cut - 40_000 * (i % 2), i % 3) for i, (u, s) in enumerate(
        (u, s) for u in USERS for s in SELLERS)]  # fmt: skip
    enc = SnapshotEncoder(cut, TTLS)
    by_user: dict[str, list[str]] = {}
    for r in rows:
        enc.add(by_user, *r)
    assert enc.value is not None
    first = await store.apply_same_value(by_user, enc.value)
    expected = sum(len(derive.snapshot_row(*r, cut, TTLS)) for r in rows)
    assert (first.applied, first.stale, first.failed_users) == (expected, 0, {})
    replay = await store.apply_same_value(by_user, enc.value)  # the same batch again
    assert (replay.applied, replay.stale) == (0, expected)
    # an unfollow at exactly the cut: on equal versions the tombstone wins, in either order
    user, field = USERS[0], by_user[USERS[0]][0]
    tomb = MembershipLayout.encode(cut, cut + 60_000, tombstone=True)
    assert (await store.apply_args({user: [field, tomb, ""]})).applied == 1
    assert (await store.apply_same_value({user: [field]}, enc.value)).stale == 1
    await aredis.delete(store.layout.user_key(user))
    assert (await store.apply_same_value(by_user, enc.value)).applied == len(by_user[user])
    ref: dict[str, list[str]] = {}
    group_writes([w for r in rows for w in derive.snapshot_row(*r, cut, TTLS)], ref)
    again = await store.apply_args(ref)  # the reference encoding of the same rows: no change
    assert (again.applied, again.stale) == (0, expected)
    # the same rows through the general script and through redis-py's pipeline (the cluster
    # path) end in exactly the same hashes and key expiries
    general = MembershipStore(aredis, MembershipLayout(namespace + "g:"), clock)
    await general.apply_args(ref)
    piped = MembershipStore(aredis, MembershipLayout(namespace + "q:"), clock)
    piped._send_packed = piped._send_pipeline  # type: ignore[method-assign]
    await piped.apply_same_value(by_user, enc.value)
    mine = await state(aredis, store.layout)
    assert mine == await state(aredis, general.layout) == await state(aredis, piped.layout)
    assert len(mine) == len(USERS)
    # a later snapshot replaces every record; an older one changes nothing
    later = SnapshotEncoder(cut + 5000, TTLS)
    newer: dict[str, list[str]] = {}
    for r in rows:
        later.add(newer, *r)
    assert later.value is not None and later.value != enc.value
    assert (await store.apply_same_value(newer, later.value)).applied == expected
    assert (await store.apply_same_value(by_user, enc.value)).stale == expected


async def test_a_dropped_connection_mid_batch_is_retried_once(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=5)
    try:
        clock = ManualClock((time.time_ns() // 1_000_000 // 1000 + 600) * 1000)
        store = MembershipStore(client, MembershipLayout("t:"), clock)
        t = clock.now_ms()
        await store.apply(derive.follow("u", "1", t, TTLS))
        await client.client_kill_filter(skipme=False)  # every connection, the pooled one too
        r = await store.apply(derive.follow("u", "2", t, TTLS) + derive.follow("v", "2", t, TTLS))
        assert (r.applied, r.failed_users) == (2, {})
        assert await store.member_crowds("u", [Crowd("1", CrowdKind.ALL_FANS)]) != frozenset()
        private_redis.stop()
        with pytest.raises(RedisConnectionError):
            await store.apply(derive.follow("w", "3", t, TTLS))
    finally:
        await client.aclose()


async def test_a_silent_redis_times_out_and_the_connection_is_not_reused(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=0.5)
    try:
        clock = ManualClock((time.time_ns() // 1_000_000 // 1000 + 600) * 1000)
        store = MembershipStore(client, MembershipLayout("t:"), clock)
        t = clock.now_ms()
        await store.apply(derive.follow("u", "1", t, TTLS))
        private_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await store.apply(derive.follow("u", "2", t, TTLS))
            assert time.monotonic() - started < 5  # two attempts of ~0.5 s, not forever
        finally:
            private_redis.resume()
        # the replies of the timed-out batch must not be read as this batch's replies
        r = await store.apply(derive.unfollow("u", "1", t + 1, TTLS))
        assert (r.applied, r.stale) == (3, 0)
        assert await store.member_crowds("u", [Crowd("1", CrowdKind.ALL_FANS)]) == frozenset()
    finally:
        await client.aclose()
