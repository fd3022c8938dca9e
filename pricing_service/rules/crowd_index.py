"""The in-process crowd index: every seller-defined crowd, kept fresh from the crowd change feed.

The page path resolves a rule's ``crowd_id`` through :attr:`CrowdIndex.by_key` (a plain dict,
updated in place, so the membership store holds it once). Loaded from
:meth:`~pricing_service.rules.crowd_store.CrowdStore.load_crowds`, then refreshed every
``rule_refresh_interval_ms`` from :meth:`crowd_changes_since`; revisions are consecutive, so a
gap reloads. Crowds are few (at most ``PRICING_MAX_CROWDS_PER_SELLER`` per seller) and
immutable once created, so the index holds all of them.

A rule whose crowd the index does not know yet (created a moment ago on another replica) has
no members on the page path until the next refresh: a discount shows up to one refresh late,
never wrongly. CheckDiscountStrict reads crowds from the store itself.

``on_change`` is called after every change of the definitions (the membership store drops the
lookup plans it memoised). ``on_lists`` is told of the list crowds (all of them after a load, then each creation and
deletion) so that the server can publish them in Redis for the list file loader; a failed
publication is retried at the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Protocol

import structlog

from pricing_service.crowds import CrowdDef
from pricing_service.domain import CrowdKey
from pricing_service.rules.store import CREATE, DELETE, CrowdChange

log = structlog.get_logger("pricing_service.rules.crowd_index")

FEED_BATCH = 1000

#: (list crowds created or all of them after a load, list crowds deleted)
ListsHook = Callable[[Sequence[CrowdDef], Sequence[CrowdDef]], Awaitable[None]]


class CrowdSource(Protocol):
    async def load_crowds(self) -> tuple[list[CrowdDef], int]: ...

    async def crowd_changes_since(self, revision: int, limit: int) -> list[CrowdChange]: ...


class CrowdIndex:
    """``async with CrowdIndex(store, interval_s) as index: index.by_key.get((seller, id))``."""

    def __init__(
        self,
        store: CrowdSource,
        interval_s: float,
        *,
        on_lists: ListsHook | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._on_lists = on_lists
        #: called after the definitions changed (the membership store forgets its plans)
        self._on_change = on_change
        #: (seller_id, crowd_id) -> definition; mutated in place, never replaced
        self.by_key: dict[CrowdKey, CrowdDef] = {}
        self._revision = 0
        self._loaded = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._unpublished: tuple[list[CrowdDef], list[CrowdDef]] = ([], [])

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __len__(self) -> int:
        return len(self.by_key)

    async def load(self) -> None:
        crowds, revision = await self._store.load_crowds()
        self.by_key.clear()
        self.by_key.update({(c.seller_id, c.crowd_id): c for c in crowds})
        self._revision = revision
        self._loaded = True
        if self._on_change is not None:
            self._on_change()
        log.info("crowd_index_loaded", crowds=len(crowds), revision=revision)
        self._unpublished = ([c for c in crowds if c.is_list], [])
        await self._publish()

    async def refresh(self) -> int:
        """Apply the change feed up to the store's present; return the changes applied."""
        applied = 0
        while True:
            changes = await self._store.crowd_changes_since(self._revision, FEED_BATCH)
            if not changes:
                break
            if changes[0].revision != self._revision + 1:
                log.warning("crowd_index_feed_gap", have=self._revision, next=changes[0].revision)
                await self.load()
                return applied
            created, deleted = self._unpublished
            for c in changes:
                key = (c.crowd.seller_id, c.crowd.crowd_id)
                if c.action == CREATE:
                    self.by_key[key] = c.crowd
                    if c.crowd.is_list:
                        created.append(c.crowd)
                elif c.action == DELETE:
                    self.by_key.pop(key, None)
                    if c.crowd.is_list:
                        deleted.append(c.crowd)
            self._revision = changes[-1].revision
            applied += len(changes)
            if self._on_change is not None:
                self._on_change()
            if len(changes) < FEED_BATCH:
                break
        await self._publish()
        return applied

    async def _publish(self) -> None:
        created, deleted = self._unpublished
        if self._on_lists is None or not (created or deleted):
            self._unpublished = ([], [])
            return
        await self._on_lists(created, deleted)
        self._unpublished = ([], [])

    async def run(self) -> None:
        while True:
            try:
                if self._loaded:
                    await self.refresh()
                else:
                    await self.load()
                if self._failing:
                    self._failing = False
                    log.info("crowd_index_recovered", revision=self._revision)
            except Exception as exc:  # store or Redis errors: keep serving what we have
                if not self._failing:
                    self._failing = True
                    log.warning("crowd_index_refresh_failed", error=repr(exc))
            await asyncio.sleep(self._interval_s)

    async def __aenter__(self) -> CrowdIndex:
        try:
            await self.load()
        except Exception as exc:  # the loop keeps trying; health stays NOT_SERVING
            self._failing = True
            log.warning("crowd_index_refresh_failed", error=repr(exc))
        self._task = asyncio.create_task(self.run(), name="crowd-index-refresh")
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
