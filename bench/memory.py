"""Memory per membership: this layout (one hash per buyer) vs the seed's (one string key each).

    python -m bench.memory --memberships 1000000

Starts a private redis-server (never the shared one), loads N memberships through
``MembershipStore.apply`` (the real Lua write path), measures ``used_memory``, flushes, loads the
same memberships in the seed layout (``SET <user>_<crowd> 1 PX <ttl>``), measures again. The last
line printed is one JSON object.

Workload (seeded, deterministic): buyers have 10-digit numeric ids; how many sellers a buyer
follows is skewed - 70 % follow 1-5, 25 % follow 6-30, 5 % follow 100-300; sellers are numeric
ids up to 2,000,000, popular ones more often; every follow is an all_fans membership, half of them
also old_fans, a quarter also purchased_fans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from collections.abc import Iterator

import redis.asyncio as aioredis

from pricing_service.domain import Crowd, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, MembershipWrite, Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from tests.support.redis_server import RedisServer

TTLS = Ttls.from_seconds(48 * 3600, 48 * 3600, 30)


def follows_per_buyer(rnd: random.Random) -> int:
    p = rnd.random()
    if p < 0.70:
        return rnd.randint(1, 5)
    if p < 0.95:
        return rnd.randint(6, 30)
    return rnd.randint(100, 300)


def workload(n: int, seed: int, cut_ms: int) -> Iterator[list[MembershipWrite]]:
    """Per buyer, the snapshot writes of its follows; exactly ``n`` memberships in total."""
    rnd = random.Random(seed)
    left = n
    user = 1_000_000_000
    while left > 0:
        user += rnd.randint(1, 50)
        sellers: set[int] = set()
        for _ in range(follows_per_buyer(rnd)):
            # popularity: a quarter of follows go to the top 10k sellers
            top = 10_000 if rnd.random() < 0.25 else 2_000_000
            sellers.add(rnd.randint(1, top))
        writes: list[MembershipWrite] = []
        for s in sorted(sellers):
            followed = cut_ms - (40 if rnd.random() < 0.5 else 5) * DAY_MS
            purchases = 1 if rnd.random() < 0.25 else 0
            writes.extend(derive.snapshot_row(str(user), str(s), followed, purchases, cut_ms, TTLS))
        writes = writes[:left]
        left -= len(writes)
        yield writes


def seed_key(w: MembershipWrite, compact: bool) -> str:
    c: Crowd = w.crowd
    if compact:
        return f"{w.user_id}_{c.seller_id}_{int(c.kind)}"
    return f"{w.user_id}_{c}"  # e.g. 1000012345_sellers/42/crowds/all_fans


async def used_memory(r: aioredis.Redis) -> int:
    info = await r.info("memory")
    return int(info["used_memory"])


async def load_layout(
    r: aioredis.Redis, n: int, seed: int, batch_users: int
) -> tuple[int, int, float]:
    store = MembershipStore(r, MembershipLayout(""), SystemClock())
    await store.load_script()
    cut = SystemClock().now_ms() - 3_600_000
    before = await used_memory(r)
    t = time.perf_counter()
    batch: list[MembershipWrite] = []
    users = loaded = 0
    for writes in workload(n, seed, cut):
        users += 1
        batch.extend(writes)
        if users % batch_users == 0:
            res = await store.apply(batch)
            assert not res.failed_users and res.applied == len(batch), res
            loaded += len(batch)
            batch = []
    if batch:
        res = await store.apply(batch)
        assert res.applied == len(batch), res
        loaded += len(batch)
    elapsed = time.perf_counter() - t
    assert loaded == n
    return (await used_memory(r)) - before, users, elapsed


async def load_seed(
    r: aioredis.Redis, n: int, seed: int, compact: bool
) -> tuple[int, int, float, int]:
    cut = SystemClock().now_ms() - 3_600_000
    before = await used_memory(r)
    t = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    queued = key_bytes = 0
    for writes in workload(n, seed, cut):
        for w in writes:
            key = seed_key(w, compact)
            key_bytes += len(key)
            pipe.set(key, "1", px=w.expires_ms - SystemClock().now_ms())
            queued += 1
        if queued >= 5000:
            await pipe.execute()
            queued = 0
    await pipe.execute()
    return (await used_memory(r)) - before, key_bytes, time.perf_counter() - t, n


async def key_breakdown(r: aioredis.Redis, sample: int) -> dict[str, object]:
    """MEMORY USAGE vs field count on a sample of keys: least squares -> per key / per field."""
    xs: list[int] = []
    ys: list[int] = []
    encodings: dict[str, int] = {}
    async for key in r.scan_iter(match="cm:*", count=1000):
        n = int(await r.hlen(key))
        xs.append(n)
        ys.append(int(await r.memory_usage(key, samples=0) or 0))
        enc = await r.object("encoding", key)
        e = enc.decode() if isinstance(enc, bytes) else str(enc)
        encodings[e] = encodings.get(e, 0) + 1
        if len(xs) >= sample:
            break
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return {
        "sampled_keys": len(xs),
        "memory_usage_per_field": round(slope, 2),
        "memory_usage_per_key": round(my - slope * mx, 1),
        "encodings": encodings,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    extra = [
        "--hash-max-listpack-entries",
        str(args.listpack_entries),
        "--hash-max-listpack-value",
        "64",
    ]
    with RedisServer(extra_args=extra) as server:
        r = aioredis.Redis.from_url(server.url, socket_timeout=60)
        try:
            delta, users, secs = await load_layout(r, args.memberships, args.seed, args.batch_users)
            bpm = delta / args.memberships
            print(
                f"layout: {args.memberships} memberships of {users} buyers in {secs:.1f}s "
                f"({args.memberships / secs:,.0f}/s via MembershipStore.apply): "
                f"{delta:,} B = {bpm:.2f} B/membership, {delta / users:.0f} B/buyer"
            )
            breakdown = await key_breakdown(r, 3000)
            print(f"layout breakdown (MEMORY USAGE regression): {breakdown}")
            results: dict[str, float] = {}
            for compact in (False, True):
                await r.flushall()
                sdelta, kbytes, ssecs, n = await load_seed(r, args.memberships, args.seed, compact)
                name = "seed_compact" if compact else "seed"
                results[name] = sdelta / n
                print(
                    f"{name} layout ({'<user>_<seller>_<kind>' if compact else '<user>_<crowd>'}"
                    f", avg key {kbytes / n:.1f} chars): {sdelta:,} B = {sdelta / n:.2f}"
                    f" B/membership, loaded in {ssecs:.1f}s"
                )
        finally:
            await r.aclose()
    return {
        "memberships": args.memberships,
        "users": users,
        "memberships_per_user": round(args.memberships / users, 2),
        "bytes_per_membership": round(bpm, 2),
        "seed_bytes_per_membership": round(results["seed"], 2),
        "ratio": round(bpm / results["seed"], 4),
        "seed_compact_bytes_per_membership": round(results["seed_compact"], 2),
        "ratio_vs_seed_compact": round(bpm / results["seed_compact"], 4),
        "target_bytes": 25,
        "target_ratio": 0.25,
        "met": bpm <= 25 and bpm / results["seed"] <= 0.25,
        "hash_max_listpack_entries": args.listpack_entries,
        **{k: v for k, v in breakdown.items() if k != "encodings"},
        "load_rate_per_s": round(args.memberships / secs),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--memberships", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-users", type=int, default=500, help="buyers per apply() pipeline")
    p.add_argument(
        "--listpack-entries",
        type=int,
        default=1024,
        help="hash-max-listpack-entries of the scratch server (the Redis 7 default is 512)",
    )
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
