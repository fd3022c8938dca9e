"""What each source of facts writes: the one place that knows how events and rows become facts.

Every write is unconditional (a fact is recorded whatever else is known), and merged in Redis
order-independently (:mod:`.layout`), so arrival order never changes the result:

* follow at t     -> follow part: following since t, version t
* unfollow at t   -> follow part: tombstone, version t (lives the tombstone TTL)
* purchase at t   -> purchase part: at least one purchase, the last at t
* snapshot row    -> follow part: following since ``followed_at``, version = the cut; and, when
  ``purchase_count >= 1``, a purchase part: that count as of the cut (and ``last_purchase_at``
  when the export has it)
* list change     -> the buyer's entry on a list crowd: added or removed, versioned
"""

from __future__ import annotations

from dataclasses import dataclass

from pricing_service.domain import DAY_MS
from pricing_service.membership.layout import (
    EPOCH_MS,
    F_FOLLOW,
    F_PURCHASES,
    MAX_COUNT,
    MAX_VERSION_MS,
    Facts,
    Follow,
    MembershipLayout,
    Purchases,
)

__all__ = [
    "DAY_MS",
    "FactWrite",
    "ListWrite",
    "MembershipWrite",
    "SnapshotEncoder",
    "Ttls",
    "follow",
    "list_change",
    "purchase",
    "snapshot_row",
    "unfollow",
]


@dataclass(frozen=True, slots=True)
class FactWrite:
    """Facts about one (buyer, seller) relation, merged into what Redis holds."""

    user_id: str
    seller_id: str
    facts: Facts


@dataclass(frozen=True, slots=True)
class ListWrite:
    """A buyer added to (or removed from) a list crowd; the newest change wins."""

    user_id: str
    handle: int
    version_ms: int
    removed: bool
    #: lifetime of a removal (the tombstone TTL); 0 for an add, which never expires
    ttl_s: int = 0


MembershipWrite = FactWrite | ListWrite


@dataclass(frozen=True, slots=True)
class Ttls:
    """Lifetimes of facts, and the old-fan threshold (built-in old_fans; legacy conversion)."""

    membership_ms: int
    tombstone_ms: int
    old_fan_min_ms: int

    @classmethod
    def from_seconds(cls, membership_s: int, tombstone_s: int, old_fan_min_days: int) -> Ttls:
        return cls(membership_s * 1000, tombstone_s * 1000, old_fan_min_days * DAY_MS)


def follow(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    return [
        FactWrite(
            user_id,
            seller_id,
            Facts(Follow(occurred_ms, False, occurred_ms + ttls.membership_ms, occurred_ms)),
        )
    ]


def unfollow(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    return [
        FactWrite(
            user_id, seller_id, Facts(Follow(occurred_ms, True, occurred_ms + ttls.tombstone_ms))
        )
    ]


def purchase(user_id: str, seller_id: str, occurred_ms: int, ttls: Ttls) -> list[MembershipWrite]:
    """A purchase is recorded whatever the follow state: membership is decided at read time."""
    return [
        FactWrite(
            user_id,
            seller_id,
            Facts(None, Purchases(occurred_ms + ttls.membership_ms, 1, occurred_ms)),
        )
    ]


def snapshot_row(
    user_id: str,
    seller_id: str,
    followed_at_ms: int,
    purchase_count: int,
    cut_ms: int,
    ttls: Ttls,
    last_purchase_ms: int = 0,
) -> list[MembershipWrite]:
    expires = cut_ms + ttls.membership_ms
    purchases = (
        Purchases(expires, purchase_count, last_purchase_ms) if purchase_count >= 1 else None
    )
    return [
        FactWrite(
            user_id, seller_id, Facts(Follow(cut_ms, False, expires, followed_at_ms), purchases)
        )
    ]


def list_change(
    user_id: str, handle: int, version_ms: int, *, removed: bool, ttls: Ttls
) -> ListWrite:
    return ListWrite(
        user_id, handle, version_ms, removed, ttls.tombstone_ms // 1000 if removed else 0
    )


def encode_write(w: MembershipWrite) -> tuple[str, str | bytes]:
    """(field, value) of a write (:class:`~.layout.LayoutError` when it cannot be represented:
    a fact dated outside the layout's time range)."""
    if isinstance(w, FactWrite):
        return MembershipLayout.fact_field(w.seller_id), MembershipLayout.encode_facts(w.facts)
    return MembershipLayout.list_field(w.handle), MembershipLayout.encode_list(
        w.version_ms, removed=w.removed, ttl_s=w.ttl_s
    )


def _s4(ms: int, *, up: bool) -> bytes:
    s = -(-ms // 1000) if up else ms // 1000
    return min(max(s, 0), 0xFFFF_FFFF).to_bytes(4, "big")


class SnapshotEncoder:
    """Fast path of :func:`snapshot_row` for bulk loads: no write object is built.

    :meth:`add` appends to ``by_user[user]`` the (field, value) of
    ``snapshot_row(user, seller, followed_at_ms, purchase_count, cut_ms, ttls, last)``,
    encoded exactly as :meth:`MembershipLayout.encode_facts` would (the unit tests hold them
    equal): every row of a snapshot shares the cut (version) and the expiries, so only the
    follow's start and the purchase part differ. A cut outside the layout's time range writes
    nothing; its rows are counted in :attr:`stale` (as the store counts them).
    """

    __slots__ = ("_expires4", "_fields", "_follow", "_follow_p", "_purchase", "cut_ms", "stale")

    #: Sellers whose fields are memoised (cleared when full).
    CACHE_SIZE = 65_536

    def __init__(self, cut_ms: int, ttls: Ttls) -> None:
        self.cut_ms = cut_ms
        self.stale = 0
        self._fields: dict[str, str] = {}
        #: purchase count -> the purchase part (last purchase time unknown)
        self._purchase: dict[int, bytes] = {}
        self._follow = self._follow_p = b""
        expires = cut_ms + ttls.membership_ms
        self._expires4 = _s4(expires, up=True)
        if EPOCH_MS < cut_ms <= MAX_VERSION_MS:
            head = self._expires4 + (cut_ms - EPOCH_MS).to_bytes(5, "big")
            self._follow = bytes((F_FOLLOW,)) + head
            self._follow_p = bytes((F_FOLLOW | F_PURCHASES,)) + head

    @property
    def valid(self) -> bool:
        return bool(self._follow)

    def add(
        self,
        by_user: dict[str, list[str | bytes]],
        user_id: str,
        seller_id: str,
        followed_at_ms: int,
        purchase_count: int,
        last_purchase_ms: int = 0,
    ) -> None:
        """The write of one snapshot row (inputs already validated, as for snapshot_row)."""
        if not self._follow:
            self.stale += 1
            return
        field = self._fields.get(seller_id)
        if field is None:
            s = seller_id
            # MembershipLayout.fact_field inlined (most sellers of a snapshot are seen once
            # or twice); the unit tests hold them equal
            if 0 < len(s) <= 15 and s.isascii() and s.isdigit() and s[0] != "0":
                field = str(int(s) * 4)
            else:
                field = "f" + s
            if len(self._fields) >= self.CACHE_SIZE:
                self._fields.clear()
            self._fields[seller_id] = field
        since = -(-followed_at_ms // 1000)
        since4 = (since if 0 <= since <= 0xFFFF_FFFF else min(max(since, 0), 0xFFFF_FFFF)).to_bytes(
            4, "big"
        )
        if purchase_count < 1:
            value = self._follow + since4
        elif last_purchase_ms:
            value = (
                self._follow_p
                + since4
                + self._expires4
                + min(purchase_count, MAX_COUNT).to_bytes(2, "big")
                + _s4(last_purchase_ms, up=False)
            )
        else:
            part = self._purchase.get(purchase_count)
            if part is None:
                part = (
                    self._expires4
                    + min(purchase_count, MAX_COUNT).to_bytes(2, "big")
                    + (b"\x00" * 4)
                )
                if len(self._purchase) < 1024:
                    self._purchase[purchase_count] = part
            value = self._follow_p + since4 + part
        args = by_user.get(user_id)
        if args is None:
            by_user[user_id] = [field, value]
        else:
            args.append(field)
            args.append(value)
