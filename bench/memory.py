"""Memory per (buyer, seller) relation: the fact layout vs the layout before it, side by side.

    python -m bench.memory [--relations 600000] [--workload memory|realistic] [--list-members N]

Starts a private redis-server (never the shared one). For the same snapshot rows it loads, one
after the other into an empty Redis, and measures ``used_memory`` each time:

1. **today's layout before issue 14** (one record per crowd: all_fans, old_fans when followed
   30+ days before the cut, purchased_fans when the count is 1+), written by main's own write
   script (``pricing_testing.legacy_layout``);
2. **the fact layout** (one fact field per relation), written by the sync worker's snapshot
   path (``SnapshotEncoder`` + ``MembershipStore.apply_args``);
3. the seed layout of issue 3 (``SET <user>_<crowd> 1 PX <ttl>`` per record), for reference;
4. **list crowds** on top of the fact layout: ``--list-members`` buyers, half of them buyers
   that already have a hash (measured for their first list, which also makes their key
   persistent, and for a second list) and half new buyers (their key is the list entry alone).

Workloads (seeded, deterministic): ``memory`` (this benchmark's own since issue 3: 10-digit
buyer ids; 70 % of buyers follow 1-5 sellers, 25 % 6-30, 5 % 100-300; half the follows are old
fans, a quarter purchased) or ``realistic`` (``sync_worker.snapshot_gen.realistic_rows``, the
rows ``bench.snapshot`` loads: follows over two years, 30 % with 1-20 purchases). The last line
printed is one JSON object.
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

from pricing_service.domain import SystemClock
from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, SnapshotEncoder, Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_testing import legacy_layout
from pricing_testing.redis_server import RedisServer
from sync_worker.snapshot_gen import realistic_rows

TTLS = Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
Row = tuple[str, str, int, int]  # user, seller, followed_at, purchase_count


def follows_per_buyer(rnd: random.Random) -> int:
    p = rnd.random()
    if p < 0.70:
        return rnd.randint(1, 5)
    if p < 0.95:
        return rnd.randint(6, 30)
    return rnd.randint(100, 300)


def memory_rows(n: int, seed: int, cut_ms: int) -> Iterator[list[Row]]:
    """Per buyer, its relations; exactly ``n`` relations in total."""
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
        rows: list[Row] = []
        for s in sorted(sellers)[:left]:
            followed = cut_ms - (40 if rnd.random() < 0.5 else 5) * DAY_MS
            rows.append((str(user), str(s), followed, 1 if rnd.random() < 0.25 else 0))
        left -= len(rows)
        yield rows


def realistic(n: int, seed: int, cut_ms: int) -> Iterator[list[Row]]:
    buyer: list[Row] = []
    for r in realistic_rows(n, cut_ms, seed=seed):
        if buyer and buyer[0][0] != r.user_id:
            yield buyer
            buyer = []
        buyer.append((r.user_id, r.seller_id, r.followed_at_ms, r.purchase_count))
    if buyer:
        yield buyer


async def used_memory(r: aioredis.Redis) -> int:
    info = await r.info("memory")
    return int(info["used_memory"])


async def load_legacy(
    r: aioredis.Redis, buyers: list[list[Row]], cut: int, batch: int
) -> tuple[int, int]:
    """(bytes, records) of today's layout."""
    writer = legacy_layout.LegacyWriter(r)
    before = await used_memory(r)
    records = 0
    now = SystemClock().now_ms()
    for i in range(0, len(buyers), batch):
        by_user: dict[str, list[legacy_layout.Triple]] = {}
        for rows in buyers[i : i + batch]:
            triples = [
                t for _, s, f, n in rows for t in legacy_layout.snapshot_row(s, f, n, cut, TTLS)
            ]
            by_user[rows[0][0]] = triples
            records += len(triples)
        assert await writer.apply(by_user, now) == sum(len(t) for t in by_user.values())
    return (await used_memory(r)) - before, records


async def load_facts(
    r: aioredis.Redis, buyers: list[list[Row]], cut: int, batch: int
) -> tuple[int, int]:
    """(bytes, fields) of the fact layout, through the snapshot loader's write path."""
    store = MembershipStore(r, MembershipLayout(""), SystemClock())
    before = await used_memory(r)
    fields = 0
    for i in range(0, len(buyers), batch):
        enc = SnapshotEncoder(cut, TTLS)
        by_user: dict[str, list[str | bytes]] = {}
        for rows in buyers[i : i + batch]:
            for u, s, f, n in rows:
                enc.add(by_user, u, s, f, n)
        res = await store.apply_args(by_user)
        want = sum(len(a) // 2 for a in by_user.values())
        assert not res.failed_users and res.applied == want, res
        fields += want
    return (await used_memory(r)) - before, fields


async def load_seed(r: aioredis.Redis, buyers: list[list[Row]], cut: int) -> tuple[int, int]:
    """(bytes, keys) of the seed layout: one string key per legacy record."""
    before = await used_memory(r)
    pipe = r.pipeline(transaction=False)
    n = queued = 0
    ttl = cut + TTLS.membership_ms - SystemClock().now_ms()
    for rows in buyers:
        for u, s, f, c in rows:
            for field, _, _ in legacy_layout.snapshot_row(s, f, c, cut, TTLS):
                pipe.set(f"{u}_{field}", "1", px=ttl)
                n += 1
                queued += 1
        if queued >= 5000:
            await pipe.execute()
            queued = 0
    await pipe.execute()
    return (await used_memory(r)) - before, n


async def load_list(
    r: aioredis.Redis, buyers: list[list[Row]], members: int, seed: int
) -> dict[str, float]:
    """A list crowd's bytes per member: on buyers that have a hash (their first list, which
    also makes their key persistent: a list add never expires, and their second), and on new
    buyers (the key is the list entry alone)."""
    store = MembershipStore(r, MembershipLayout(""), SystemClock())
    rnd = random.Random(seed)
    existing = [rows[0][0] for rows in rnd.sample(buyers, min(members // 2, len(buyers)))]
    fresh = [f"list-only-{i:08d}" for i in range(members - len(existing))]
    now = SystemClock().now_ms()
    out: dict[str, float] = {}
    for name, handle, users in (
        ("first_list_existing_buyers", 7, existing),
        ("existing_buyers", 8, existing),
        ("new_buyers", 7, fresh),
    ):
        before = await used_memory(r)
        for i in range(0, len(users), 5000):
            writes = [
                derive.list_change(u, handle, now, removed=False, ttls=TTLS)
                for u in users[i : i + 5000]
            ]
            res = await store.apply(writes)
            assert res.applied == len(writes), res
        out[name] = ((await used_memory(r)) - before) / max(len(users), 1)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    extra = ["--hash-max-listpack-entries", str(args.listpack_entries),
             "--hash-max-listpack-value", "64"]  # fmt: skip
    cut = SystemClock().now_ms() - 3_600_000
    gen = memory_rows if args.workload == "memory" else realistic
    buyers = list(gen(args.relations, args.seed, cut))
    relations = sum(len(b) for b in buyers)
    with RedisServer(extra_args=extra) as server:
        r = aioredis.Redis.from_url(server.url, socket_timeout=60)
        try:
            t = time.perf_counter()
            legacy_b, records = await load_legacy(r, buyers, cut, args.batch_users)
            legacy_s = time.perf_counter() - t
            print(f"before issue 14: {relations:,} relations of {len(buyers):,} buyers = "
                  f"{records:,} records ({records / relations:.2f} per relation): {legacy_b:,} B ="
                  f" {legacy_b / records:.2f} B/record, {legacy_b / relations:.2f} B/relation "
                  f"(loaded in {legacy_s:.1f}s)", flush=True)  # fmt: skip
            await r.flushall()  # the benchmark's own private server
            t = time.perf_counter()
            facts_b, fields = await load_facts(r, buyers, cut, args.batch_users)
            facts_s = time.perf_counter() - t
            print(f"facts: {fields:,} fields: {facts_b:,} B = {facts_b / relations:.2f} "
                  f"B/relation (loaded in {facts_s:.1f}s)", flush=True)  # fmt: skip
            list_bytes: dict[str, float] = {}
            if args.list_members:
                list_bytes = await load_list(r, buyers, args.list_members, args.seed)
                print(f"list crowds of {args.list_members:,} members: "
                      f"{list_bytes['existing_buyers']:.2f} B/member on buyers with a hash "
                      f"({list_bytes['first_list_existing_buyers']:.2f} for their first list: "
                      f"the key no longer expires), {list_bytes['new_buyers']:.2f} B/member on "
                      "new buyers", flush=True)  # fmt: skip
            await r.flushall()
            seed_b, seed_n = await load_seed(r, buyers, cut)
            print(f"seed layout (issue 3): {seed_b / seed_n:.2f} B/record, "
                  f"{seed_b / relations:.2f} B/relation", flush=True)  # fmt: skip
        finally:
            await r.aclose()
    per_rel_legacy, per_rel_facts = legacy_b / relations, facts_b / relations
    return {
        "bench": "memory",
        "workload": args.workload,
        "relations": relations,
        "buyers": len(buyers),
        "legacy_records": records,
        "legacy_records_per_relation": round(records / relations, 3),
        "legacy_bytes_per_record": round(legacy_b / records, 2),
        "legacy_bytes_per_relation": round(per_rel_legacy, 2),
        "facts_bytes_per_relation": round(per_rel_facts, 2),
        "ratio_facts_to_legacy": round(per_rel_facts / per_rel_legacy, 4),
        "met": per_rel_facts <= per_rel_legacy,
        "seed_bytes_per_record": round(seed_b / seed_n, 2),
        "list_members": args.list_members,
        "list_bytes_per_member_existing_buyers": round(list_bytes.get("existing_buyers", 0), 2),
        "list_bytes_per_member_first_list_existing_buyers": round(
            list_bytes.get("first_list_existing_buyers", 0), 2
        ),
        "list_bytes_per_member_new_buyers": round(list_bytes.get("new_buyers", 0), 2),
        "hash_max_listpack_entries": args.listpack_entries,
        "load_s_legacy": round(legacy_s, 2),
        "load_s_facts": round(facts_s, 2),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--relations", type=int, default=600_000)
    p.add_argument("--workload", choices=["memory", "realistic"], default="memory")
    p.add_argument("--list-members", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-users", type=int, default=500, help="buyers per write pipeline")
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
