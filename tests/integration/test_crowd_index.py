"""The in-process crowd index against a real rule store: load, the change feed, list publishing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.rules.crowd_index import CrowdIndex
from pricing_service.rules.factory import open_rule_store
from pricing_testing.rule_stores import settings_for, sqlite_url

pytestmark = pytest.mark.integration


async def test_the_index_follows_the_feed_and_publishes_lists(tmp_path: Path) -> None:
    store = await open_rule_store(settings_for(sqlite_url(tmp_path)))
    published: list[tuple[list[str], list[str]]] = []
    fail = [True]

    async def on_lists(created: Sequence[CrowdDef], deleted: Sequence[CrowdDef]) -> None:
        if fail[0]:
            fail[0] = False
            raise ConnectionError("Redis is away")  # retried at the next refresh
        published.append(([c.crowd_id for c in created], [c.crowd_id for c in deleted]))

    try:
        await store.create_crowd(CrowdDef("42", "loyal", Predicate(min_follow_days=30)), "t")
        await store.create_crowd(CrowdDef("42", "vip", None), "t")
        index = CrowdIndex(store, 0.01, on_lists=on_lists)
        with pytest.raises(ConnectionError):
            await index.load()
        assert index.loaded and len(index) == 2  # the definitions are served meanwhile
        assert index.by_key[("42", "vip")].list_handle == 1
        assert await index.refresh() == 0 and published == [(["vip"], [])]  # retried
        by_key = index.by_key
        await store.create_crowd(CrowdDef("7", "vip", None), "t")
        await store.record_member_change("42", "vip", 3, 0, "t")  # not a definition change
        await store.delete_crowd("42", "vip", "t")
        assert await index.refresh() == 3
        assert index.by_key is by_key  # mutated in place: the membership store holds it
        assert set(index.by_key) == {("42", "loyal"), ("7", "vip")}
        assert index.by_key[("7", "vip")].list_handle == 2  # handles are never reused
        assert published[-1] == (["vip"], ["vip"])
        assert index.revision == await store.crowd_revision()
    finally:
        await store.close()
