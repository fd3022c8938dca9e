"""Derivation of crowd membership records from facts: the one place that knows the rules.

* follow   -> all_fans member
* unfollow -> tombstones for all three of that seller's crowds
* purchase -> purchased_fans member, only while the buyer is a current fan (checked atomically
  in Redis by the write's condition, never read-then-write)
* snapshot row -> all_fans; old_fans when ``followed_at`` is at least ``old_fan_min_days``
  before the snapshot cut; purchased_fans when ``purchase_count >= 1``
"""

from __future__ import annotations

from dataclasses import dataclass

from pricing_service.domain import Crowd, CrowdKind

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class MembershipWrite:
    """One versioned record to apply (last writer wins by ``version_ms``)."""

    user_id: str
    crowd: Crowd
    tombstone: bool
    version_ms: int
    expires_ms: int
    #: Apply only while this crowd is a live membership of the same buyer.
    requires: Crowd | None = None


@dataclass(frozen=True, slots=True)
class Ttls:
    """Lifetimes of records, and the old-fan threshold."""

    membership_ms: int
    tombstone_ms: int
    old_fan_min_ms: int

    @classmethod
    def from_seconds(cls, membership_s: int, tombstone_s: int, old_fan_min_days: int) -> Ttls:
        return cls(membership_s * 1000, tombstone_s * 1000, old_fan_min_days * DAY_MS)


def follow(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    return [
        MembershipWrite(
            user_id,
            Crowd(seller_id, CrowdKind.ALL_FANS),
            False,
            occurred_ms,
            occurred_ms + ttls.membership_ms,
        )
    ]


def unfollow(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    return [
        MembershipWrite(
            user_id, Crowd(seller_id, kind), True, occurred_ms, occurred_ms + ttls.tombstone_ms
        )
        for kind in CrowdKind
    ]


def purchase(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    return [
        MembershipWrite(
            user_id,
            Crowd(seller_id, CrowdKind.PURCHASED_FANS),
            False,
            occurred_ms,
            occurred_ms + ttls.membership_ms,
            requires=Crowd(seller_id, CrowdKind.ALL_FANS),
        )
    ]


def snapshot_row(
    user_id: str,
    seller_id: str,
    followed_at_ms: int,
    purchase_count: int,
    cut_ms: int,
    ttls: Ttls,
) -> list[MembershipWrite]:
    expires = cut_ms + ttls.membership_ms
    kinds = [CrowdKind.ALL_FANS]
    if followed_at_ms <= cut_ms - ttls.old_fan_min_ms:
        kinds.append(CrowdKind.OLD_FANS)
    if purchase_count >= 1:
        kinds.append(CrowdKind.PURCHASED_FANS)
    return [MembershipWrite(user_id, Crowd(seller_id, k), False, cut_ms, expires) for k in kinds]
