"""The in-process rule index: the hot path's view of the rule store, bounded in memory.

Loaded from :meth:`RuleStore.load_all` (rules + the revision they reflect, one snapshot), then
kept fresh from the change feed (:meth:`RuleStore.changes_since`) every
``rule_refresh_interval_ms``. Revisions are consecutive (one per change), so a gap in the feed
means something was missed and the index reloads instead of drifting.

Memory is bounded by ``rule_index_max_items`` (items, each with its few rules). While the store
has no more items than that, the index holds all of them and is *complete*: an item it does not
hold has no rules, and a page never waits for the store. Beyond it the index is a cache: a
least-recently-used map of items, where an item read from the store with no rules is held too
(negative caching, most items of a catalogue have no crowd rules). A miss is read from the store
(:meth:`fetch`: one query for all of a page's misses, shared with any page already reading the
same item) and admitted; the least recently used items are dropped.

Never missing a change: every held item, negative or not, follows the change feed. An item read
from the store at revision S reflects every change up to S; the feed skips changes up to S for
it and applies the later ones. A read older than the feed's position (the feed moved on while
the store answered) is answered but not admitted: changes to that item between its read and
the feed's position were not applied to anything, so holding it could serve a stale rule
until its next change.

Store errors never stop the loop: the index keeps answering from what it has (its age grows,
see :attr:`age_ms` and the ``pricing_rule_index_age_seconds`` gauge), logs once per outage
and catches up when the store is back. A miss during an outage raises the store's error to the
page, which answers those items at list price (degraded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from pricing_service.config import Settings
from pricing_service.domain import Clock, Rule
from pricing_service.metrics import Metrics
from pricing_service.rules.store import RuleChange, RuleStore
from pricing_service.tracing import internal_span, rule_store_read

if TYPE_CHECKING:
    from pricing_service.tracing import Tracing

log = structlog.get_logger("pricing_service.rules.index")

FEED_BATCH = 1000
_EMPTY: tuple[Rule, ...] = ()


class RuleIndex:
    """``async with RuleIndex(store, settings, clock) as index: index.lookup(items)``."""

    def __init__(
        self,
        store: RuleStore,
        settings: Settings,
        clock: Clock,
        metrics: Metrics | None = None,
        *,
        on_change: Callable[[Sequence[RuleChange]], None] | None = None,
        max_items: int | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._clock = clock
        self._metrics = metrics
        self._interval_s = settings.rule_refresh_interval_ms / 1000
        # a read in flight is abandoned only after 10 page budgets (and never under 1 s): the
        # pages that wait for it give up after one budget each
        self._fetch_timeout_s = max(settings.rule_fetch_budget_ms / 100, 1.0)
        self._on_change = on_change
        self._max_items = max_items if max_items is not None else settings.rule_index_max_items
        self._by_item: OrderedDict[str, tuple[Rule, ...]] = OrderedDict()
        self._complete = False  # holds every item that has rules: absent means none
        self._fresh: dict[str, int] = {}  # item -> revision its store read reflects (> feed's)
        self._reading: dict[str, asyncio.Task[dict[str, tuple[Rule, ...]]]] = {}
        self._revision = 0
        self._last_sync_ms = 0
        self._loaded = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._count = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.stale_reads = 0

    # --- the hot path -----------------------------------------------------------------------
    def lookup(self, item_ids: Iterable[str]) -> list[tuple[Rule, ...] | None]:
        """Each item's rules (``()``: none), or ``None`` where the index does not know: read
        those with :meth:`fetch`. No I/O."""
        by_item = self._by_item
        if self._complete:
            get = by_item.get
            return [get(i, _EMPTY) for i in item_ids]
        touch = by_item.move_to_end
        found: list[tuple[Rule, ...] | None] = []
        misses = 0
        for i in item_ids:
            rules = by_item.get(i)
            if rules is None:
                misses += 1
            else:
                touch(i)
            found.append(rules)
        self.misses += misses
        self.hits += len(found) - misses
        m = self._metrics
        if m is not None:
            if misses:
                m.rule_index_lookups_miss.inc(misses)
            if len(found) > misses:
                m.rule_index_lookups_hit.inc(len(found) - misses)
        return found

    def rules_for(self, item_id: str) -> tuple[Rule, ...]:
        """The item's rules as held now, ``()`` when none are held. No I/O; does not count as
        a use. For a complete index this is the answer; otherwise see :meth:`lookup`."""
        return self._by_item.get(item_id, _EMPTY)

    async def fetch(self, item_ids: Sequence[str]) -> dict[str, tuple[Rule, ...]]:
        """Read items from the store, admit them, return their rules.

        One store query for the items no other caller is already reading; the others wait for
        that caller's read. The read is a task of its own: a caller that gives up (its budget,
        its deadline) does not cancel it, so the next page finds the items admitted. Raises
        the store's error (or TimeoutError after the read's own limit)."""
        reading = self._reading
        wanted = list(dict.fromkeys(item_ids))
        need = [i for i in wanted if i not in reading]
        with internal_span(
            self._tracing,
            "rule_index.fetch",
            {"pricing.items": len(wanted), "pricing.items_read": len(need)},
        ):
            if need:  # (the read's span, a task of its own, is a child of this one)
                task = asyncio.create_task(self._read(need), name="rule-index-fetch")
                for i in need:
                    reading[i] = task
                task.add_done_callback(functools.partial(self._read_done, need))
            tasks = {reading[i] for i in wanted}
            out: dict[str, tuple[Rule, ...]] = {}
            for t in tasks:
                out.update(await asyncio.shield(t))
        return {i: out[i] for i in wanted}

    async def _read(self, items: list[str]) -> dict[str, tuple[Rule, ...]]:
        start = time.perf_counter()
        async with asyncio.timeout(self._fetch_timeout_s):
            with rule_store_read(self._tracing, len(items)):
                rules, revision = await self._store.rules_for_items(items)
        if self._metrics is not None:
            self._metrics.rule_fetch_seconds.observe(time.perf_counter() - start)
        grouped: dict[str, list[Rule]] = {i: [] for i in items}
        for r in rules:
            grouped[r.item_id].append(r)
        found = {i: tuple(v) for i, v in grouped.items()}
        self._admit(found, revision)
        return found

    def _read_done(self, items: list[str], task: asyncio.Task[dict[str, tuple[Rule, ...]]]) -> None:
        reading = self._reading
        for i in items:
            if reading.get(i) is task:
                del reading[i]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be waiting any more

    def _admit(self, found: dict[str, tuple[Rule, ...]], revision: int) -> None:
        if self._complete:
            return  # a complete index already holds the truth for these items
        if revision < self._revision:
            self.stale_reads += 1  # the feed moved past the read: see the module docstring
            return
        by_item, fresh = self._by_item, self._fresh
        newer = revision > self._revision
        for item, rules in found.items():
            held = by_item.get(item)
            if held is not None:
                if fresh.get(item, self._revision) >= revision:
                    continue
                self._count -= len(held)
            by_item[item] = rules
            by_item.move_to_end(item)
            self._count += len(rules)
            if newer:
                fresh[item] = revision
        self._evict()

    def _evict(self) -> None:
        by_item, fresh = self._by_item, self._fresh
        dropped = 0
        while len(by_item) > self._max_items:
            item, rules = by_item.popitem(last=False)
            self._count -= len(rules)
            fresh.pop(item, None)
            dropped += 1
        if dropped:
            self.evictions += dropped
            if self._metrics is not None:
                self._metrics.rule_index_evictions.inc(dropped)

    @property
    def complete(self) -> bool:
        """True while the index holds every item that has rules (no misses)."""
        return self._complete

    @property
    def items(self) -> int:
        """Items held (with rules, or known to have none)."""
        return len(self._by_item)

    @property
    def max_items(self) -> int:
        return self._max_items

    @property
    def revision(self) -> int:
        """Store revision the index reflects."""
        return self._revision

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def last_sync_ms(self) -> int:
        """Clock time of the last successful sync (0 before the first)."""
        return self._last_sync_ms

    @property
    def age_ms(self) -> int:
        """How stale the index may be: time since it last heard from the store."""
        return self._clock.now_ms() - self._last_sync_ms if self._last_sync_ms else -1

    def __len__(self) -> int:
        """Rules held."""
        return self._count

    # --- loading ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Replace the whole index with the store's current content (up to the bound)."""
        cap = self._max_items
        rules, revision = await self._store.load_all(cap)
        by_item: OrderedDict[str, list[Rule]] = OrderedDict()
        for r in rules:
            by_item.setdefault(r.item_id, []).append(r)
        complete = len(by_item) <= cap
        while len(by_item) > cap:
            by_item.popitem()  # the store's "there are more" item
        self._by_item = OrderedDict((k, tuple(v)) for k, v in by_item.items())
        self._complete = complete
        self._fresh = {}
        self._count = sum(len(v) for v in self._by_item.values())
        self._revision = revision
        self._loaded = True
        self._synced()
        log.info(
            "rule_index_loaded",
            rules=self._count,
            items=len(self._by_item),
            complete=complete,
            max_items=cap,
            revision=revision,
        )

    async def refresh(self) -> int:
        """Apply the change feed up to the store's present; return the changes applied."""
        applied = 0
        while True:
            changes = await self._store.changes_since(self._revision, FEED_BATCH)
            if not changes:
                break
            if changes[0].revision != self._revision + 1:
                log.warning(
                    "rule_index_feed_gap",
                    have=self._revision,
                    next=changes[0].revision,
                )
                await self.load()
                return applied
            for c in changes:
                self._apply(c)
            self._revision = changes[-1].revision
            applied += len(changes)
            if self._complete and len(self._by_item) > self._max_items:
                self._complete = False
                log.warning(
                    "rule_index_bounded",
                    items=len(self._by_item),
                    max_items=self._max_items,
                    revision=self._revision,
                )
                self._evict()
            if self._fresh:
                rev = self._revision
                self._fresh = {i: r for i, r in self._fresh.items() if r > rev}
            if self._on_change is not None:
                self._on_change(changes)
            if len(changes) < FEED_BATCH:
                break
        self._synced()
        return applied

    def _apply(self, change: RuleChange) -> None:
        """One change to the one item it concerns (a rule's item and crowd never change)."""
        rule = change.rule
        item = rule.item_id
        by_item = self._by_item
        current = by_item.get(item)
        if current is None:
            if not self._complete or change.deleted:
                return  # not held: the next miss reads it as it is then
            current = _EMPTY
        elif self._fresh and self._fresh.get(item, 0) >= change.revision:
            return  # the item's store read already reflects this change
        rule_id = rule.rule_id
        if change.deleted:
            kept = tuple(r for r in current if r.rule_id != rule_id)
        else:
            # one rule per (item, crowd): a replacement under another id evicts the old one
            crowd = rule.crowd_key
            kept = (*(r for r in current if r.rule_id != rule_id and r.crowd_key != crowd), rule)
        self._count += len(kept) - len(current)
        if kept or not self._complete:
            by_item[item] = kept  # bounded: an item with no rules is held as known-empty
        else:
            del by_item[item]  # complete: absent means no rules

    def _synced(self) -> None:
        self._last_sync_ms = self._clock.now_ms()
        m = self._metrics
        if m is not None:
            m.rule_index_revision.set(self._revision)
            m.rule_index_rules.set(self._count)
            m.rule_index_items.set(len(self._by_item))
            m.rule_index_complete.set(1 if self._complete else 0)
            m.rule_index_age.set(0)

    # --- the refresh loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Load (until it succeeds), then follow the change feed until cancelled."""
        while True:
            try:
                if self._loaded:
                    await self.refresh()
                else:
                    await self.load()
                if self._failing:
                    self._failing = False
                    log.info("rule_index_recovered", revision=self._revision)
            except Exception as exc:  # store errors, mapped or not: keep serving what we have
                self._outage(exc)
            if self._metrics is not None and self._last_sync_ms:
                self._metrics.rule_index_age.set(max(self.age_ms, 0) / 1000)
            await asyncio.sleep(self._interval_s)

    def _outage(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "rule_index_refresh_failed",
                error=repr(exc),
                revision=self._revision,
                loaded=self._loaded,
            )

    async def __aenter__(self) -> RuleIndex:
        try:
            await self.load()
        except Exception as exc:  # the loop below keeps trying; health stays NOT_SERVING
            self._outage(exc)
        self._task = asyncio.create_task(self.run(), name="rule-index-refresh")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        for reading in set(self._reading.values()):
            reading.cancel()  # miss reads still running (no page waits: the server stopped)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
