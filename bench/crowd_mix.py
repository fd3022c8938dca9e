"""The crowds of ``bench.serving``'s page: built-in only, or a mix with seller-defined crowds.

``--crowds builtin`` (the default): every item has an all_fans, an old_fans and a
purchased_fans rule. ``--crowds seller``: the same items and prices, but the old_fans rule
targets the seller's predicate crowd ``loyal60`` (followed 60+ days, bought at least once) and
the purchased_fans rule the seller's list crowd ``vip`` - so a page asks for built-in, predicate
and list crowds at once (one HMGET: each seller's fact field and each list's field). The
benchmark buyer is on the ``vip`` list of half the page's sellers, and on no other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.domain import CrowdKind, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.store import MembershipStore

PREDICATE_ID = "loyal60"
LIST_ID = "vip"
MODES = ("builtin", "seller")


def target(kind: CrowdKind, mode: str) -> tuple[CrowdKind, str]:
    """The crowd a rule of built-in ``kind`` targets in ``mode``: (kind, crowd_id)."""
    if mode == "seller" and kind == CrowdKind.OLD_FANS:
        return CrowdKind.SELLER_DEFINED, PREDICATE_ID
    if mode == "seller" and kind == CrowdKind.PURCHASED_FANS:
        return CrowdKind.SELLER_DEFINED, LIST_ID
    return kind, ""


async def define(store: Any, sellers: Sequence[str], mode: str) -> None:
    """Create each seller's crowds (before the rules that target them)."""
    if mode != "seller":
        return
    for s in sellers:
        await store.create_crowd(
            CrowdDef(s, PREDICATE_ID, Predicate(min_follow_days=60, min_purchases=1)), "bench"
        )
        await store.create_crowd(CrowdDef(s, LIST_ID, None), "bench")


async def members(
    store: Any,
    membership: MembershipStore,
    page_sellers: Sequence[str],
    buyer: str,
    others: Sequence[str],
    ttls: derive.Ttls,
    mode: str,
) -> None:
    """List members: the benchmark buyer on half the page's sellers' lists, others on all."""
    if mode != "seller":
        return
    now = SystemClock().now_ms()
    writes: list[derive.MembershipWrite] = []
    for k, s in enumerate(page_sellers):
        handle = (await store.get_crowd(s, LIST_ID)).list_handle
        if k % 2 == 0:
            writes.append(derive.list_change(buyer, handle, now, removed=False, ttls=ttls))
        writes += [derive.list_change(u, handle, now, removed=False, ttls=ttls) for u in others]
    result = await membership.apply(writes)
    if result.failed_users:
        raise RuntimeError(f"list writes failed: {result.failed_users}")
