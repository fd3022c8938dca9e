"""RuleIndex over a real store: the refresh loop, outages of the store, a gap in the feed."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from pricing_service.domain import CrowdKind, ManualClock, Money, Rule, SystemClock
from pricing_service.metrics import Metrics
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_testing.rule_stores import pg_schema, settings_for, sqlite_url

pytestmark = pytest.mark.integration


def rule(item: str, amount: int = 100, kind: CrowdKind = CrowdKind.ALL_FANS) -> Rule:
    return Rule("", "42", item, kind, Money("CNY", amount))


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_background_refresh_picks_up_writes_of_another_process_store(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    settings = settings_for(url, rule_refresh_interval_ms=20)
    writer = await open_rule_store(settings)
    reader = await open_rule_store(settings, migrate=False)
    metrics = Metrics()
    try:
        await writer.upsert(rule("before"), "w")
        async with RuleIndex(reader, settings, SystemClock(), metrics) as index:
            assert index.loaded and index.revision == 1
            assert [r.item_id for r in index.rules_for("before")] == ["before"]
            written, _ = await writer.upsert(rule("after", 55), "w")
            await wait_for(lambda: index.rules_for("after") == (written,))
            assert index.revision == 2
            assert metrics.rule_index_revision._value.get() == 2
            assert metrics.rule_index_rules._value.get() == 2
            assert 0 <= index.age_ms < 5000
    finally:
        await writer.close()
        await reader.close()


async def test_index_keeps_serving_through_a_store_outage_and_catches_up(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    settings = settings_for(url, rule_refresh_interval_ms=20)
    store = await open_rule_store(settings)
    clock = ManualClock()
    try:
        kept, _ = await store.upsert(rule("kept"), "w")
        async with RuleIndex(store, settings, clock) as index:
            synced_at = index.last_sync_ms
            # break the change feed for real: the table disappears under the index
            with sqlite3.connect(tmp_path / "rules.db") as raw:
                raw.execute("ALTER TABLE rule_changes RENAME TO rule_changes_away")
            clock.advance(3000)
            await asyncio.sleep(0.2)  # several failed refreshes
            assert index.loaded
            assert index.rules_for("kept") == (kept,)  # still answering
            assert index.last_sync_ms == synced_at
            assert index.age_ms >= 3000  # and it knows it is stale
            with sqlite3.connect(tmp_path / "rules.db") as raw:
                raw.execute("ALTER TABLE rule_changes_away RENAME TO rule_changes")
            new, _ = await store.upsert(rule("new"), "w")
            await wait_for(lambda: index.rules_for("new") == (new,))
            assert index.last_sync_ms > synced_at
    finally:
        await store.close()


async def test_index_started_without_a_store_becomes_loaded_when_it_appears(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    settings = settings_for(url, rule_refresh_interval_ms=20)
    store = await open_rule_store(settings, migrate=False)  # schema not there yet
    try:
        async with RuleIndex(store, settings, SystemClock()) as index:
            await asyncio.sleep(0.1)
            assert not index.loaded
            assert index.rules_for("x") == ()
            await store.migrate()
            r, _ = await store.upsert(rule("x"), "w")
            await wait_for(lambda: index.loaded and index.rules_for("x") == (r,))
    finally:
        await store.close()


async def test_a_gap_in_the_feed_triggers_a_full_reload(pg_url: str) -> None:
    with pg_schema(pg_url) as url:
        settings = settings_for(url)
        store = await open_rule_store(settings)
        try:
            a, _ = await store.upsert(rule("a"), "w")
            index = RuleIndex(store, settings, SystemClock())
            await index.load()
            b, _ = await store.upsert(rule("b"), "w")
            c, _ = await store.upsert(rule("c"), "w")
            await store.delete(a.rule_id, "w")
            # the feed loses revision 2 (as if pruned): the index must not apply 3.. blindly
            import psycopg  # noqa: PLC0415

            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute("DELETE FROM rule_changes WHERE revision = 2")
            await index.refresh()
            assert index.revision == 4
            assert index.rules_for("a") == ()
            assert index.rules_for("b") == (b,)  # only a reload can know about b
            assert index.rules_for("c") == (c,)
            assert len(index) == 2
        finally:
            await store.close()


async def test_shutdown_stops_the_loop(tmp_path: Path) -> None:
    settings = settings_for(sqlite_url(tmp_path), rule_refresh_interval_ms=10)
    store = await open_rule_store(settings)
    try:
        index = RuleIndex(store, settings, SystemClock())
        async with index:
            pass
        revision = index.revision
        await store.upsert(rule("late"), "w")
        await asyncio.sleep(0.1)
        assert index.revision == revision
        assert index.rules_for("late") == ()
    finally:
        await store.close()
