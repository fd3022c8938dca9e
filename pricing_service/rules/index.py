"""The in-process rule index: the hot path's view of the rule store, without I/O.

Loaded from :meth:`RuleStore.load_all` (rules + the revision they reflect, one snapshot), then
kept fresh from the change feed (:meth:`RuleStore.changes_since`) every
``rule_refresh_interval_ms``. Revisions are consecutive (one per change), so a gap in the feed
means something was missed and the index reloads everything instead of drifting.

Store errors never stop the loop: the index keeps answering from what it has (its age grows,
see :attr:`age_ms` and the ``pricing_rule_index_age_seconds`` gauge), logs once per outage
and catches up when the store is back.

Memory: every rule is held (a few hundred bytes each); fine for millions of rules, not bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType

import structlog

from pricing_service.config import Settings
from pricing_service.domain import Clock, CrowdKind, Rule
from pricing_service.metrics import Metrics
from pricing_service.rules.store import RuleChange, RuleStore

log = structlog.get_logger("pricing_service.rules.index")

FEED_BATCH = 1000
_EMPTY: tuple[Rule, ...] = ()


class RuleIndex:
    """``async with RuleIndex(store, settings, clock) as index: index.rules_for(item)``."""

    def __init__(
        self,
        store: RuleStore,
        settings: Settings,
        clock: Clock,
        metrics: Metrics | None = None,
        *,
        on_change: Callable[[Sequence[RuleChange]], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._interval_s = settings.rule_refresh_interval_ms / 1000
        self._on_change = on_change
        self._by_item: dict[str, tuple[Rule, ...]] = {}
        self._where: dict[str, tuple[str, CrowdKind]] = {}  # rule_id -> (item, crowd kind)
        self._revision = 0
        self._last_sync_ms = 0
        self._loaded = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._count = 0

    # --- the hot path -----------------------------------------------------------------------
    def rules_for(self, item_id: str) -> tuple[Rule, ...]:
        """The item's rules (any order of crowd kinds), ``()`` for an unknown item. No I/O."""
        return self._by_item.get(item_id, _EMPTY)

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
        return self._count

    # --- loading ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Replace the whole index with the store's current content."""
        rules, revision = await self._store.load_all()
        by_item: dict[str, list[Rule]] = {}
        where: dict[str, tuple[str, CrowdKind]] = {}
        for r in rules:
            by_item.setdefault(r.item_id, []).append(r)
            where[r.rule_id] = (r.item_id, r.kind)
        self._by_item = {k: tuple(v) for k, v in by_item.items()}
        self._where = where
        self._count = len(rules)
        self._revision = revision
        self._loaded = True
        self._synced()
        log.info("rule_index_loaded", rules=len(rules), revision=revision)

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
            if self._on_change is not None:
                self._on_change(changes)
            if len(changes) < FEED_BATCH:
                break
        self._synced()
        return applied

    def _apply(self, change: RuleChange) -> None:
        rule = change.rule
        old = self._where.pop(rule.rule_id, None)
        if old is not None:
            self._remove(old[0], rule.rule_id)
        if change.deleted:
            return
        # one rule per (item, crowd kind): a replacement under another id evicts the old one
        current = self._by_item.get(rule.item_id, _EMPTY)
        for other in current:
            if other.kind == rule.kind:
                self._where.pop(other.rule_id, None)
                self._remove(rule.item_id, other.rule_id)
        self._by_item[rule.item_id] = (*self._by_item.get(rule.item_id, _EMPTY), rule)
        self._where[rule.rule_id] = (rule.item_id, rule.kind)
        self._count += 1

    def _remove(self, item_id: str, rule_id: str) -> None:
        current = self._by_item.get(item_id, _EMPTY)
        kept = tuple(r for r in current if r.rule_id != rule_id)
        self._count -= len(current) - len(kept)
        if kept:
            self._by_item[item_id] = kept
        else:
            self._by_item.pop(item_id, None)

    def _synced(self) -> None:
        self._last_sync_ms = self._clock.now_ms()
        m = self._metrics
        if m is not None:
            m.rule_index_revision.set(self._revision)
            m.rule_index_rules.set(self._count)
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
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
