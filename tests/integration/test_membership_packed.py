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
from pricing_service.membership.derive import FactWrite, MembershipWrite, SnapshotEncoder, Ttls
from pricing_service.membership.layout import Facts, Follow, MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.membership.writer import group_writes
from pricing_testing.redis_server import RedisServer

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
        if rng.random() < 0.2:
            removed = rng.random() < 0.5
            out.append(derive.list_change(user, rng.randint(1, 3), at, removed=removed, ttls=TTLS))
    out.append(FactWrite("old", "1", Facts(Follow(5, False, 10, 5))))  # before the epoch: stale
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
        writes += derive.follow("wrong", "1", clock.now_ms(), TTLS)
        a = await packed.apply(writes)
        b = await piped.apply(writes)
        assert (a.applied, a.stale, a.converted) == (b.applied, b.stale, b.converted)
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
    by_user: dict[str, list[str | bytes]] = {}
    for r in rows:
        enc.add(by_user, *r)
    first = await store.apply_args(by_user)
    assert (first.applied, first.stale, first.failed_users) == (len(rows), 0, {})
    replay = await store.apply_args(by_user)  # the same batch again
    assert (replay.applied, replay.stale) == (0, len(rows))
    # an unfollow at exactly the cut: on equal versions the tombstone wins, in either order
    user = USERS[0]
    seller = rows[0][1]
    assert (await store.apply(derive.unfollow(user, seller, cut, TTLS))).applied == 1
    assert (await store.apply_args({user: by_user[user][:2]})).stale == 1
    ref: dict[str, list[str | bytes]] = {}
    group_writes([w for r in rows for w in derive.snapshot_row(*r, cut, TTLS)], ref)
    assert ref == by_user  # the reference encoding of the same rows
    # the same rows through redis-py's pipeline (the cluster path) end in the same hashes
    piped = MembershipStore(aredis, MembershipLayout(namespace + "q:"), clock)
    piped._send_packed = piped._send_pipeline  # type: ignore[method-assign]
    await piped.apply_args(ref)
    await piped.apply(derive.unfollow(user, seller, cut, TTLS))
    mine = await state(aredis, store.layout)
    assert mine == await state(aredis, piped.layout)
    assert len(mine) == len(USERS)
    # a later snapshot replaces every follow; an older one changes nothing
    later = SnapshotEncoder(cut + 5000, TTLS)
    newer: dict[str, list[str | bytes]] = {}
    for r in rows:
        later.add(newer, *r)
    assert (await store.apply_args(newer)).applied == len(rows)
    assert (await store.apply_args(by_user)).stale == len(rows)


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
        assert (r.applied, r.stale) == (1, 0)
        assert await store.member_crowds("u", [Crowd("1", CrowdKind.ALL_FANS)]) == frozenset()
    finally:
        await client.aclose()
