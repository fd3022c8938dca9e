"""Crowds as data: definitions, and deciding (and explaining) membership from relation facts.

A crowd of a seller is either

* a **predicate** over the buyer's relation with the seller (:class:`Predicate`): the buyer
  follows the seller, and optionally has followed for at least / at most N days, bought at
  least K times, bought within the last D days; or
* an explicit **list** of buyers the seller maintains (a list handle; entries in Redis).

The three built-in crowds are predicates (:func:`builtin_predicates`): ``all_fans`` = following,
``old_fans`` = following for at least ``PRICING_OLD_FAN_MIN_DAYS``, ``purchased_fans`` =
following with at least one purchase. Predicates are decided at read time from the stored facts
(:class:`~pricing_service.membership.layout.Facts`), so "followed >= 30 days" turns true on the
30th day and a new crowd applies to every buyer at once. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from pricing_service.domain import DAY_MS, CrowdKind
from pricing_service.membership.layout import MAX_COUNT, Facts, ListEntry

#: The longest period a predicate may name (about 27 years: longer than any relation).
MAX_DAYS: Final = 10_000
#: The largest purchase count a predicate may require (the layout keeps counts up to 65,535).
MAX_PURCHASES: Final = 10_000
assert MAX_PURCHASES <= MAX_COUNT
#: ``crowd_id``: lower-case letters, digits, ``-`` and ``_``, starting with a letter or digit.
CROWD_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: Names of the built-in crowds: no seller crowd may take them.
BUILTIN_NAMES: Final = {k.name.lower(): k for k in CrowdKind if k != CrowdKind.SELLER_DEFINED}


#: A fact record reduced to what predicates test (the page path memoises it per stored value):
#: (follow_until_ms: the follow part's expiry if it is a follow, else 0; since_ms;
#: purchases_until_ms: the purchase part's expiry, else 0; count; last_purchase_ms: 0 unknown).
Hot = tuple[int, int, int, int, int]
NO_FACTS: Final[Hot] = (0, 0, 0, 0, 0)
#: A predicate as numbers: (min follow ms, 0 = none; max follow ms, -1 = none; min purchases;
#: purchased within ms, -1 = none).
Thresholds = tuple[int, int, int, int]


def hot(facts: Facts | None) -> Hot:
    if facts is None:
        return NO_FACTS
    f, p = facts.follow, facts.purchases
    fu = since = 0
    if f is not None and not f.tombstone:
        fu, since = f.expires_ms, f.since_ms
    if p is None:
        return (fu, since, 0, 0, 0)
    return (fu, since, p.expires_ms, p.count, p.last_ms)


def holds_hot(th: Thresholds, h: Hot, now_ms: int) -> bool:
    """The one definition of membership in a predicate crowd (see :class:`Predicate`)."""
    follow_until, since, purchases_until, count, last = h
    if follow_until <= now_ms:
        return False
    min_ms, max_ms, min_purchases, within_ms = th
    if min_ms and since > now_ms - min_ms:
        return False
    if max_ms >= 0 and since < now_ms - max_ms:
        return False
    if min_purchases or within_ms >= 0:
        if purchases_until <= now_ms or count < min_purchases:
            return False
        if within_ms >= 0 and (last == 0 or last < now_ms - within_ms):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Predicate:
    """Following the seller, and every condition that is set (``None`` / 0 = no condition).

    Days are whole days of 86,400 s counted back from the time of the read: "followed at least
    N days" holds once ``now - since >= N days``, "at most N days" while ``now - since <= N
    days``, "bought within D days" while ``now - last purchase <= D days``.
    """

    min_follow_days: int = 0
    max_follow_days: int | None = None
    min_purchases: int = 0
    purchased_within_days: int | None = None
    #: the conditions as numbers (:func:`holds_hot`), computed once
    thresholds: Thresholds = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        within = self.purchased_within_days
        object.__setattr__(
            self,
            "thresholds",
            (
                self.min_follow_days * DAY_MS,
                -1 if self.max_follow_days is None else self.max_follow_days * DAY_MS,
                self.min_purchases,
                -1 if within is None else within * DAY_MS,
            ),
        )

    def holds(self, facts: Facts | None, now_ms: int) -> bool:
        """Is a buyer with these stored facts in the crowd at ``now_ms``?"""
        return holds_hot(self.thresholds, hot(facts), now_ms)

    def explain(self, facts: Facts | None, now_ms: int) -> str:
        """Why the buyer is in the crowd or not, in words (the first condition that fails)."""
        f = facts.follow if facts is not None else None
        if f is None or f.expires_ms <= now_ms:
            return "not following the seller"
        if f.tombstone:
            return f"not following the seller (unfollowed {_ago(now_ms - f.version_ms)})"
        followed = f"followed {_ago(now_ms - f.since_ms)}"
        if self.min_follow_days and f.since_ms > now_ms - self.min_follow_days * DAY_MS:
            return f"{followed}, this crowd needs {self.min_follow_days}"
        if self.max_follow_days is not None and f.since_ms < now_ms - self.max_follow_days * DAY_MS:
            return f"{followed}, this crowd takes at most {self.max_follow_days}"
        p = facts.purchases if facts is not None else None
        if p is not None and p.expires_ms <= now_ms:
            p = None
        count = p.count if p is not None else 0
        bought = f"{count} purchase{'' if count == 1 else 's'}"
        if self.min_purchases and count < self.min_purchases:
            return f"{bought}, needs {self.min_purchases}"
        within = self.purchased_within_days
        if within is not None:
            if p is None:
                return f"no purchase, this crowd needs one within {within} days"
            if p.last_ms == 0:
                return (
                    f"{bought}, time of the last unknown; this crowd needs one within {within} days"
                )
            if p.last_ms < now_ms - within * DAY_MS:
                return (
                    f"last purchase {_ago(now_ms - p.last_ms)}, this crowd needs one within "
                    f"{within} days"
                )
        return f"in the crowd: followed {_ago(now_ms - f.since_ms)}, {bought}"

    def describe(self) -> str:
        parts = ["follows the seller"]
        if self.min_follow_days:
            parts.append(f"for at least {_n_days(self.min_follow_days)}")
        if self.max_follow_days is not None:
            parts.append(f"for at most {_n_days(self.max_follow_days)}")
        if self.min_purchases:
            parts.append(f"with at least {self.min_purchases} purchases")
        if self.purchased_within_days is not None:
            parts.append(f"bought within the last {_n_days(self.purchased_within_days)}")
        return ", ".join(parts)


def _n_days(n: int) -> str:
    return f"{n} day{'' if n == 1 else 's'}"


def _ago(ms: int) -> str:
    if ms < 0:
        return "in the future (clock skew)"
    if ms < DAY_MS:
        minutes = ms // 60_000
        if minutes < 60:
            return f"{minutes} min ago"
        return f"{minutes // 60} h ago"
    return f"{_n_days(ms // DAY_MS)} ago"


def list_explain(entry: ListEntry | None, now_ms: int) -> str:
    if entry is None or entry.expires_ms <= now_ms:
        return "not on the list"
    if entry.removed:
        return f"not on the list (removed {_ago(now_ms - entry.version_ms)})"
    return f"on the list (added {_ago(now_ms - entry.version_ms)})"


def builtin_predicates(old_fan_min_days: int) -> dict[CrowdKind, Predicate]:
    """The three built-in crowds as predicates."""
    return {
        CrowdKind.ALL_FANS: Predicate(),
        CrowdKind.OLD_FANS: Predicate(min_follow_days=old_fan_min_days),
        CrowdKind.PURCHASED_FANS: Predicate(min_purchases=1),
    }


@dataclass(frozen=True, slots=True)
class CrowdDef:
    """``sellers/{seller_id}/crowds/{crowd_id}``: a predicate, or a list (``list_handle``)."""

    seller_id: str
    crowd_id: str
    predicate: Predicate | None = None
    #: the list's handle in Redis (list crowds only): assigned once, never reused
    list_handle: int = 0
    display_name: str = ""
    revision: int = 0
    create_ms: int = 0
    update_ms: int = 0

    @property
    def is_list(self) -> bool:
        return self.predicate is None

    @property
    def name(self) -> str:
        return f"sellers/{self.seller_id}/crowds/{self.crowd_id}"

    def describe(self) -> str:
        if self.predicate is None:
            return "an explicit list of buyers"
        return self.predicate.describe()
