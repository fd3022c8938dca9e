"""Moving a loaded Redis from the layout before issue 14 to facts, without a wrong price.

A Redis is loaded by main's own write script (``pricing_testing.legacy_layout``): a realistic
snapshot and a stream of follow / unfollow / purchase events after it. Every buyer's answer for
the three built-in crowds is computed the way the old readers did (a live member record and a
live all_fans record). Then, against that Redis:

* the new reader (legacy fields read until the marker is set) answers exactly the same;
* new events written by the new worker convert the buyers they touch and change only what they
  should;
* ``migrate-membership`` runs while readers keep asking: no answer differs at any moment;
* afterwards no legacy field is left, the marker is set, readers stop asking for the old fields,
  and every answer is still the same.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from pricing_service.config import load_settings
from pricing_service.domain import CrowdKey, CrowdKind, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, Ttls
from pricing_service.membership.layout import LayoutError, MembershipLayout, Record
from pricing_service.membership.store import MembershipStore
from pricing_testing import legacy_layout
from sync_worker.lists import migrate_membership
from sync_worker.snapshot_gen import realistic_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TTLS = Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
BUILTIN = (CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS)
Answers = dict[str, frozenset[CrowdKey]]


def legacy_answers(raw: dict[bytes, bytes], now: int) -> frozenset[CrowdKey]:
    """What a reader of aabd382 answered: a live member record and a live all_fans record."""
    recs: dict[tuple[str, CrowdKind], Record] = {}
    for f, v in raw.items():
        try:
            c = MembershipLayout.field_crowd(f)
            recs[(c.seller_id, c.kind)] = MembershipLayout.decode(v)
        except LayoutError:
            continue
    out = []
    for (seller, kind), r in recs.items():
        base = recs.get((seller, CrowdKind.ALL_FANS))
        if r.is_member(now) and base is not None and base.is_member(now):
            out.append((seller, kind))
    return frozenset(out)


@pytest.fixture
def loaded(redis_url: str, namespace: str) -> Iterator[tuple[dict[str, list[str]], int]]:
    """(sellers by buyer, now) after loading today's layout: snapshot rows and events."""

    async def load() -> tuple[dict[str, list[str]], int]:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
        writer = legacy_layout.LegacyWriter(client, namespace)
        now = SystemClock().now_ms()
        cut = now - 3_600_000
        sellers: dict[str, list[str]] = {}
        by_user: dict[str, list[legacy_layout.Triple]] = {}
        for r in realistic_rows(60_000, cut, seed=11, sellers=400, user_prefix="m"):
            sellers.setdefault(r.user_id, []).append(r.seller_id)
            by_user.setdefault(r.user_id, []).extend(
                legacy_layout.snapshot_row(
                    r.seller_id, r.followed_at_ms, r.purchase_count, cut, TTLS
                )
            )
        users = list(by_user)
        for i in range(0, len(users), 500):
            await writer.apply({u: by_user[u] for u in users[i : i + 500]}, now)
        rnd = random.Random(5)
        events: dict[str, list[legacy_layout.Triple]] = {}
        for _ in range(3000):  # after the cut: the stream of the last hour
            u = rnd.choice(users)
            s = rnd.choice(sellers[u] + ["9999"])
            at = cut + rnd.randrange(1, 3_000_000)
            kind = rnd.choice(["follow", "unfollow", "purchase"])
            events.setdefault(u, []).extend(getattr(legacy_layout, kind)(s, at, TTLS))
            if s not in sellers[u]:
                sellers[u].append(s)
        await writer.apply(events, now)
        await client.aclose()
        return sellers, now

    yield asyncio.run(load())


async def answers(store: MembershipStore, sellers: dict[str, list[str]], now: int) -> Answers:
    out = {}
    for user, ss in sellers.items():
        keys = [(s, k) for s in ss for k in BUILTIN]
        out[user] = await store.member_keys(user, keys, now_ms=now)
    return out


async def test_a_loaded_redis_moves_to_facts_without_a_wrong_answer(
    redis_url: str, namespace: str, loaded: tuple[dict[str, list[str]], int]
) -> None:
    sellers, now = loaded
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    layout = MembershipLayout(namespace)
    try:
        before: Answers = {}
        for user in sellers:
            raw = await client.hgetall(layout.user_key(user))
            before[user] = legacy_answers(raw, now)  # type: ignore[arg-type]
        assert sum(len(a) for a in before.values()) > 20_000, "a loaded Redis, with members"
        assert any((s, CrowdKind.OLD_FANS) in a for a in before.values() for s, _ in a)
        assert any((s, CrowdKind.PURCHASED_FANS) in a for a in before.values() for s, _ in a)

        reader = MembershipStore(client, layout, SystemClock(), old_fan_min_days=30)
        assert reader.legacy_reads
        assert await answers(reader, sellers, now) == before  # the new reader, old data

        # the new worker writes events: it converts the buyers it touches
        users = sorted(sellers)
        touched = users[:50]
        writes = [w for u in touched for w in derive.purchase(u, "777", now - 1000, TTLS)]
        writes += derive.follow(touched[0], "777", now - 2000, TTLS)
        writer = MembershipStore(client, layout, SystemClock(), old_fan_min_days=30)
        result = await writer.apply(writes)
        assert result.converted > 0 and not result.failed_users
        expected = dict(before)
        expected[touched[0]] = before[touched[0]] | {("777", CrowdKind.ALL_FANS),
                                                     ("777", CrowdKind.PURCHASED_FANS)}  # fmt: skip
        sellers[touched[0]].append("777")
        assert await answers(reader, sellers, now) == expected
        for u in touched:
            fields = await client.hkeys(layout.user_key(u))
            kinds = {layout.parse_field(f)[0] for f in fields}
            assert kinds <= {"facts"}, (u, fields)  # no legacy field left on a written buyer

        # the migration runs while readers keep asking: no window of wrong answers
        settings = load_settings(redis_url=redis_url, redis_namespace=namespace)
        mismatches: list[str] = []
        reads = 0
        done = asyncio.Event()

        async def keep_reading() -> None:
            nonlocal reads
            rnd = random.Random(9)
            while not done.is_set():
                u = rnd.choice(users)
                keys = [(s, k) for s in sellers[u] for k in BUILTIN]
                got = await reader.member_keys(u, keys, now_ms=now)
                reads += 1
                if got != expected[u]:
                    mismatches.append(f"{u}: {sorted(map(str, got ^ expected[u]))}")
                await asyncio.sleep(0)

        readers = [asyncio.create_task(keep_reading()) for _ in range(3)]
        t0 = time.monotonic()
        report = await migrate_membership(settings, client, batch=50)
        done.set()
        await asyncio.gather(*readers)
        assert not mismatches, mismatches[:5]
        assert reads > 100, "the readers ran during the migration"
        assert report["marker_set"] and report["buyer_keys"] == len(users)
        assert report["relations_converted"] > 50_000
        assert time.monotonic() - t0 < 120

        # nothing of the old layout is left; readers see the marker and stop asking for it
        async for key in client.scan_iter(match=layout.user_key_pattern(), count=1000):
            for f in await client.hkeys(key):
                assert layout.parse_field(f)[0] == "facts", (key, f)
        assert await reader.check_layout_marker()
        assert not reader.legacy_reads
        _, fields = reader.lookup_fields([("42", CrowdKind.ALL_FANS)])
        assert fields == [layout.fact_field("42").encode()]  # one field per seller now
        assert await answers(reader, sellers, now) == expected
        # and at any later time, as the facts say: old fans stay old fans a day later
        later = await answers(reader, sellers, now + DAY_MS)
        for u, a in expected.items():
            assert {k for k in a if k[1] == CrowdKind.OLD_FANS} <= later[u], u
        # a second run finds nothing to convert
        again = await migrate_membership(settings, client)
        assert again["relations_converted"] == 0 and again["marker_set"]
    finally:
        await client.aclose()
