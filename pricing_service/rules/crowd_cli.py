"""``pricing-service crowds ...``: a seller's crowds from a terminal.

Like ``pricing-service rules``, these open the rule store named by ``PRICING_RULE_STORE_URL``
directly (no server needed); ``crowds add`` / ``remove`` also write the list members to the
Redis of ``PRICING_REDIS_URL``. Each returns an exit code: 0 done, 1 refused (nothing written).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO, TypeVar

from pricing_service.config import Settings
from pricing_service.crowds import CrowdDef
from pricing_service.membership.derive import Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.writer import MembershipWriter
from pricing_service.redis_client import make_redis
from pricing_service.rules.crowd_members import member_changes, publish_list, update_members
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.store import CrowdChange
from pricing_service.rules.validation import CrowdIn, validate

T = TypeVar("T")


def crowd_json(c: CrowdDef) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": c.name,
        "seller_id": c.seller_id,
        "crowd_id": c.crowd_id,
        "display_name": c.display_name,
        "form": "list" if c.is_list else "predicate",
        "definition": c.describe(),
        "revision": c.revision,
    }
    p = c.predicate
    if p is not None:
        out["predicate"] = {
            k: v
            for k, v in (
                ("min_follow_days", p.min_follow_days or None),
                ("max_follow_days", p.max_follow_days),
                ("min_purchases", p.min_purchases or None),
                ("purchased_within_days", p.purchased_within_days),
            )
            if v is not None
        }
    return out


def change_json(c: CrowdChange) -> dict[str, Any]:
    out = {"revision": c.revision, "action": c.action, "crowd": c.crowd.name, "actor": c.actor,
           "change_ms": c.change_ms}  # fmt: skip
    if c.action == "MEMBERS":
        out.update(added=c.added, removed=c.removed)
    return out


def _membership(settings: Settings) -> MembershipWriter:
    from pricing_service.domain import SystemClock  # noqa: PLC0415

    return MembershipWriter(
        make_redis(settings),
        MembershipLayout(settings.redis_namespace),
        SystemClock(),
        old_fan_min_days=settings.old_fan_min_days,
    )


async def _print_pages(
    page: Callable[[str, int, str], Awaitable[tuple[Sequence[T], str]]],
    seller_id: str,
    to_json: Callable[[T], dict[str, Any]],
    out: TextIO,
) -> None:
    """Every page of a seller's listing (``page(seller_id, size, token)``), one JSON line each."""
    token = ""
    while True:
        entries, token = await page(seller_id, 500, token)
        for e in entries:
            print(json.dumps(to_json(e)), file=out)
        if not token:
            return


async def create(
    settings: Settings,
    *,
    seller_id: str,
    crowd_id: str,
    display_name: str = "",
    min_follow_days: int | None = None,
    max_follow_days: int | None = None,
    min_purchases: int | None = None,
    purchased_within_days: int | None = None,
    as_list: bool = False,
    actor: str = "cli",
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    data: dict[str, Any] = {"seller_id": seller_id, "crowd_id": crowd_id,
                            "display_name": display_name}  # fmt: skip
    conditions = {
        k: v
        for k, v in (
            ("min_follow_days", min_follow_days),
            ("max_follow_days", max_follow_days),
            ("min_purchases", min_purchases),
            ("purchased_within_days", purchased_within_days),
        )
        if v is not None
    }
    if as_list:
        data["list"] = True
        if conditions:
            data["predicate"] = conditions  # refused: a crowd is one or the other
    else:
        data["predicate"] = conditions
    crowd = validate(CrowdIn, data, prefix="crowd", max_id_length=settings.max_id_length)
    store = await open_rule_store(settings)
    try:
        written = await store.create_crowd(crowd.to_domain(), actor)
    finally:
        await store.close()
    if written.is_list:
        membership = _membership(settings)
        try:
            failed = await publish_list(membership, written, listed=True)
        finally:
            await membership.redis.aclose()
        if failed is not None:
            print(f"(not yet registered in Redis for list files: {failed}; a running server "
                  "registers it)", file=sys.stderr)  # fmt: skip
    print(json.dumps(crowd_json(written)), file=out)
    return 0


async def get(
    settings: Settings, *, seller_id: str, crowd_id: str, out: TextIO | None = None
) -> int:
    store = await open_rule_store(settings)
    try:
        crowd = await store.get_crowd(seller_id, crowd_id)
    finally:
        await store.close()
    print(json.dumps(crowd_json(crowd)), file=out or sys.stdout)
    return 0


async def list_all(settings: Settings, *, seller_id: str, out: TextIO | None = None) -> int:
    store = await open_rule_store(settings)
    try:
        await _print_pages(store.list_crowds, seller_id, crowd_json, out or sys.stdout)
    finally:
        await store.close()
    return 0


async def delete(
    settings: Settings,
    *,
    seller_id: str,
    crowd_id: str,
    actor: str = "cli",
    out: TextIO | None = None,
) -> int:
    store = await open_rule_store(settings)
    try:
        crowd = await store.get_crowd(seller_id, crowd_id)
        revision = await store.delete_crowd(seller_id, crowd_id, actor)
    finally:
        await store.close()
    if crowd.is_list:
        membership = _membership(settings)
        try:  # a failure is left to a running server, which unregisters it on the deletion
            await publish_list(membership, crowd, listed=False)
        finally:
            await membership.redis.aclose()
    print(json.dumps({"deleted": crowd.name, "revision": revision}), file=out or sys.stdout)
    return 0


async def history(settings: Settings, *, seller_id: str, out: TextIO | None = None) -> int:
    store = await open_rule_store(settings)
    try:
        await _print_pages(store.crowd_history, seller_id, change_json, out or sys.stdout)
    finally:
        await store.close()
    return 0


async def members(
    settings: Settings,
    *,
    seller_id: str,
    crowd_id: str,
    users: list[str],
    removed: bool,
    actor: str = "cli",
    out: TextIO | None = None,
) -> int:
    """``crowds add`` / ``crowds remove``: at most PRICING_MAX_CROWD_BATCH buyers."""
    changes = member_changes(
        [] if removed else users,
        users if removed else [],
        max_batch=settings.max_crowd_batch,
        max_id_length=settings.max_id_length,
    )
    ttls = Ttls.from_seconds(
        settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
    )
    store = await open_rule_store(settings)
    membership = _membership(settings)
    try:
        done = await update_members(store, membership, ttls, seller_id, crowd_id, changes, actor)
    finally:
        await membership.redis.aclose()
        await store.close()
    print(
        json.dumps({"crowd": done.crowd.name, "added": done.added, "removed": done.removed,
                    "version_ms": done.version_ms, "revision": done.revision}),
        file=out or sys.stdout,
    )  # fmt: skip
    return 0
