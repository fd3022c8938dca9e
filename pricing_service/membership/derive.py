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
from pricing_service.membership.layout import (
    EPOCH_MS,
    MAX_VERSION_MS,
    LayoutError,
    MembershipLayout,
)

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


#: A seller's snapshot ARGV: (all), (all, old), (all, purchased), (all, old, purchased). Tuples
#: of strings, not lists: the cyclic GC stops tracking them, and a snapshot has many sellers.
_Combos = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]


class SnapshotEncoder:
    """Fast path of :func:`snapshot_row` for bulk loads: no :class:`MembershipWrite` is built.

    :meth:`add` appends to ``by_user[user]`` the fields of the writes of
    ``snapshot_row(user, seller, followed_at_ms, purchase_count, cut_ms, ttls)``, in order: every
    write of a snapshot has the same version (the cut) and expiry and no condition, so they all
    carry one encoded :attr:`value`, written with :meth:`MembershipStore.apply_same_value
    <pricing_service.membership.store.MembershipStore.apply_same_value>` (the same result as
    :meth:`~pricing_service.membership.store.MembershipStore.apply` of the rows' writes). Each
    seller's fields are built once. A cut outside the layout's time range writes nothing; its
    writes are counted in :attr:`stale` (as the store counts them).
    """

    __slots__ = ("_combos", "_error", "_value", "cut_ms", "old_before_ms", "stale")

    #: Sellers whose fields are memoised (cleared when full).
    CACHE_SIZE = 65_536

    def __init__(self, cut_ms: int, ttls: Ttls) -> None:
        self.cut_ms = cut_ms
        #: followed at or before this: old fan (as in :func:`snapshot_row`)
        self.old_before_ms = cut_ms - ttls.old_fan_min_ms
        self.stale = 0
        self._value: str | None = None
        self._error: LayoutError | None = None
        if EPOCH_MS < cut_ms <= MAX_VERSION_MS:
            try:
                self._value = MembershipLayout.encode(
                    cut_ms, cut_ms + ttls.membership_ms, tombstone=False
                )
            except LayoutError as exc:  # raised where the store would raise it: on a write
                self._error = exc
        #: seller -> fields of (all), (all, old), (all, purchased), (all, old, purchased)
        self._combos: dict[str, _Combos] = {}

    @property
    def value(self) -> str | None:
        """The encoded value of every write (None when the cut is outside the layout)."""
        return self._value

    def _seller(self, seller_id: str) -> _Combos:
        s = seller_id
        # MembershipLayout.crowd_field inlined (most sellers of a snapshot are seen once or
        # twice, so this runs for a good share of the rows); the unit tests hold them equal
        if 0 < len(s) <= 15 and s.isascii() and s.isdigit() and s[0] != "0":
            base = int(s) * 4
            a = (str(base + 1),)
            o = (str(base + 2),)
            p = (str(base + 3),)
        else:
            a = ("a" + s,)
            o = ("o" + s,)
            p = ("p" + s,)
        if len(self._combos) >= self.CACHE_SIZE:
            self._combos.clear()
        combos = self._combos[seller_id] = (a, a + o, a + p, a + o + p)
        return combos

    def add(
        self,
        by_user: dict[str, list[str]],
        user_id: str,
        seller_id: str,
        followed_at_ms: int,
        purchase_count: int,
    ) -> None:
        """The writes of one snapshot row (inputs already validated, as for snapshot_row)."""
        if self._value is None:
            if self._error is not None:
                raise self._error
            self.stale += 1 + (followed_at_ms <= self.old_before_ms) + (purchase_count >= 1)
            return
        combos = self._combos.get(seller_id) or self._seller(seller_id)
        argv = combos[(followed_at_ms <= self.old_before_ms) + 2 * (purchase_count >= 1)]
        args = by_user.get(user_id)
        if args is None:
            by_user[user_id] = list(argv)
        else:
            args += argv
