"""Domain types shared by the server, the rule store and the sync worker.

Money is an ``int`` amount in minor units plus an ISO-4217 code; time is UTC milliseconds
since the Unix epoch (``int``). Nothing here does I/O.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

#: One day in milliseconds (crowd predicates count whole days).
DAY_MS = 86_400_000


class CrowdKind(enum.IntEnum):
    """Audience of a seller. Values equal the ``pricing.v1.CrowdKind`` enum numbers.

    The first three are the built-in crowds (predicates over the buyer's relation with the
    seller, :mod:`pricing_service.crowds`); ``SELLER_DEFINED`` marks a crowd the seller defined,
    named by its ``crowd_id``.
    """

    ALL_FANS = 1
    OLD_FANS = 2
    PURCHASED_FANS = 3
    SELLER_DEFINED = 4

    @property
    def specificity(self) -> int:
        """Higher is more specific (a smaller, more deserving audience)."""
        return _SPECIFICITY[self]


#: A seller's own crowd is its most deliberate audience: on equal prices it wins the tie.
_SPECIFICITY = {
    CrowdKind.ALL_FANS: 0,
    CrowdKind.OLD_FANS: 1,
    CrowdKind.PURCHASED_FANS: 2,
    CrowdKind.SELLER_DEFINED: 3,
}

#: What identifies a crowd on the hot path: ``(seller_id, kind)`` for a built-in crowd,
#: ``(seller_id, crowd_id)`` for a seller-defined one (tuples hash in C).
CrowdKey = tuple[str, CrowdKind | str]


def crowd_key(seller_id: str, kind: CrowdKind, crowd_id: str = "") -> CrowdKey:
    return (seller_id, crowd_id) if crowd_id else (seller_id, kind)


@dataclass(frozen=True, slots=True)
class Crowd:
    """``sellers/<seller_id>/crowds/<kind or crowd_id>``."""

    seller_id: str
    kind: CrowdKind
    #: the seller's crowd id (``kind`` is then ``SELLER_DEFINED``); empty for a built-in crowd
    crowd_id: str = ""

    def __str__(self) -> str:
        return f"sellers/{self.seller_id}/crowds/{self.crowd_id or self.kind.name.lower()}"

    @property
    def key(self) -> CrowdKey:
        return crowd_key(self.seller_id, self.kind, self.crowd_id)


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount: ``amount_minor`` minor units of ``currency``."""

    currency: str
    amount_minor: int

    def __str__(self) -> str:
        return f"{self.amount_minor} {self.currency} (minor units)"


@dataclass(frozen=True, slots=True)
class Rule:
    """A targeted fixed-price discount: [crowd] + [item] + [price], valid in [start, end).

    The crowd is a built-in ``kind``, or (``kind`` ``SELLER_DEFINED``) the seller's crowd
    ``crowd_id``.
    """

    rule_id: str
    seller_id: str
    item_id: str
    kind: CrowdKind
    price: Money
    start_ms: int | None = None
    end_ms: int | None = None
    revision: int = 0
    create_ms: int = 0
    update_ms: int = 0
    crowd_id: str = ""
    #: :func:`crowd_key` of the rule's crowd, computed once (the page loop tests it per rule)
    crowd_key: CrowdKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crowd_key", crowd_key(self.seller_id, self.kind, self.crowd_id))

    @property
    def crowd(self) -> Crowd:
        return Crowd(self.seller_id, self.kind, self.crowd_id)

    def started(self, now_ms: int) -> bool:
        return self.start_ms is None or self.start_ms <= now_ms

    def ended(self, now_ms: int) -> bool:
        return self.end_ms is not None and now_ms >= self.end_ms

    def active(self, now_ms: int) -> bool:
        return self.started(now_ms) and not self.ended(now_ms)


class Clock(Protocol):
    """Source of the current time in UTC milliseconds (injected so tests can move it)."""

    def now_ms(self) -> int: ...


class SystemClock:
    """The wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, start_ms: int | None = None) -> None:
        self._now = SystemClock().now_ms() if start_ms is None else start_ms

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a clock only moves forward")
        self._now += ms
