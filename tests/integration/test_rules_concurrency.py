"""Racing writers and readers during writes, on both backends.

Each writer and reader is a store instance of its own (its own connections: on SQLite its own
threads and file handles, on PostgreSQL its own pool), as separate replicas would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pricing_service.domain import CrowdKind, Money, Rule
from pricing_service.errors import FailedPreconditionError
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.sql_store import SqlRuleStore
from pricing_testing.rule_stores import BACKENDS, pg_schema, settings_for, sqlite_url

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_schema(request.getfixturevalue("pg_url")) as url:
            yield url


async def open_many(url: str, n: int) -> list[SqlRuleStore]:
    first = await open_rule_store(settings_for(url))
    rest = [await open_rule_store(settings_for(url), migrate=False) for _ in range(n - 1)]
    return [first, *rest]


async def close_all(stores: list[SqlRuleStore]) -> None:
    for s in stores:
        await s.close()


async def test_two_sellers_racing_for_the_same_items(store_url: str) -> None:
    a, b, check = await open_many(store_url, 3)
    try:

        async def claim(store: SqlRuleStore, seller: str, item: str) -> str | None:
            try:
                await store.upsert(
                    Rule("", seller, item, CrowdKind.ALL_FANS, Money("CNY", 100)), seller
                )
            except FailedPreconditionError as exc:
                assert exc.reason == "ITEM_OWNED_BY_OTHER_SELLER"
                return None
            return seller

        items = [f"contested-{n}" for n in range(25)]
        results = await asyncio.gather(
            *(claim(s, seller, i) for i in items for s, seller in ((a, "A"), (b, "B")))
        )
        winners = [w for w in results if w is not None]
        assert len(winners) == len(items)  # exactly one claim per item succeeded
        rules, revision = await check.load_all()
        assert revision == len(items) == len(rules)
        by_item = {r.item_id: r.seller_id for r in rules}
        assert set(by_item) == set(items)
        assert sorted(by_item.values()) == sorted(winners)
    finally:
        await close_all([a, b, check])


async def test_same_seller_racing_on_one_rule(store_url: str) -> None:
    a, b, check = await open_many(store_url, 3)
    try:

        async def write(store: SqlRuleStore, base: int) -> None:
            for n in range(20):
                await store.upsert(
                    Rule("", "42", "hot", CrowdKind.OLD_FANS, Money("CNY", base + n)), str(base)
                )

        await asyncio.gather(write(a, 1000), write(b, 2000))
        rules, revision = await check.rules_for_item("hot")
        assert len(rules) == 1
        changes = await check.changes_since(0, 1000)
        assert [c.revision for c in changes] == list(range(1, 41)) and revision == 40
        assert {c.rule.rule_id for c in changes} == {rules[0].rule_id}
        assert rules[0].price == changes[-1].rule.price  # the last committed write won
    finally:
        await close_all([a, b, check])


async def test_readers_see_consistent_snapshots_and_a_gapless_feed(store_url: str) -> None:
    w1, w2, reader, follower = await open_many(store_url, 4)
    done = asyncio.Event()
    per_writer = 60
    try:

        async def write(store: SqlRuleStore, name: str) -> None:
            for n in range(0, per_writer, 3):
                if n % 2:
                    await store.upsert(
                        Rule("", name, f"{name}-{n}", CrowdKind.ALL_FANS, Money("CNY", 1 + n)), name
                    )
                    await store.upsert(
                        Rule("", name, f"{name}-{n + 1}", CrowdKind.ALL_FANS, Money("CNY", 1)), name
                    )
                    await store.upsert(
                        Rule("", name, f"{name}-{n + 2}", CrowdKind.ALL_FANS, Money("CNY", 1)), name
                    )
                else:
                    await store.upsert_many(
                        [
                            Rule("", name, f"{name}-{k}", CrowdKind.ALL_FANS, Money("CNY", 1 + k))
                            for k in range(n, n + 3)
                        ],
                        name,
                    )

        snapshots = 0

        async def read() -> None:
            nonlocal snapshots
            while not done.is_set():
                rules, revision = await reader.load_all()
                # writers only add rules, one revision each: a snapshot is exactly its revision
                assert len(rules) == revision
                assert max((r.revision for r in rules), default=0) == revision
                snapshots += 1
                await asyncio.sleep(0)

        seen: list[int] = []

        async def follow() -> None:
            position = 0
            while True:
                finished = done.is_set()
                for c in await follower.changes_since(position, 7):
                    assert c.revision == position + 1, (
                        f"feed skipped from {position} to {c.revision}"
                    )
                    position = c.revision
                    seen.append(c.revision)
                if finished and position == 2 * per_writer:
                    return
                await asyncio.sleep(0.001)

        readers = [asyncio.create_task(read()), asyncio.create_task(follow())]
        await asyncio.gather(write(w1, "A"), write(w2, "B"))
        done.set()
        await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
        assert seen == list(range(1, 2 * per_writer + 1))
        assert snapshots > 1
    finally:
        done.set()
        await close_all([w1, w2, reader, follower])
