"""The Redis layout of crowd membership: the only module that knows key names and encodings.

Both ``pricing_service`` and ``sync_worker`` import this module; nothing else touches these keys.

Keys (``<ns>`` is ``PRICING_REDIS_NAMESPACE``, empty by default):

* ``<ns>cm:{<user_id>}`` - one hash per buyer. The braces are a Redis Cluster hash tag, so every
  field of a buyer lives in one slot: a page's lookup is one ``HMGET`` and every write is one
  single-key Lua call, on standalone Redis and on Redis Cluster alike.
* ``<ns>sync:watermark`` - the stream consumer's watermark (ms): every event published before it
  has been applied.
* ``<ns>sync:snapshot:{<snapshot_id>}`` - snapshot loader checkpoints (hash: part -> rows done).
* ``<ns>sync:list:{<load_id>}`` - list file loader checkpoints (same shape).
* ``<ns>crowd-lists`` - the registry of list crowds (hash: ``sellers/<s>/crowds/<id>`` -> list
  handle), written by the pricing service; the list file loader resolves crowds through it.
* ``<ns>membership:layout`` - ``"2"`` once ``sync-worker migrate-membership`` converted every
  buyer hash: from then on readers stop asking for the fields of the previous layout.

Fields of a buyer hash - **facts**, not crowds (a crowd is decided from them at read time):

* the **fact field** of (buyer, seller): for a canonical numeric seller id
  (``[1-9][0-9]{0,14}``) the decimal integer ``seller * 4`` (Redis stores it as an integer
  inside the listpack), any other seller id ``f<seller_id>``;
* the **list field** of (buyer, list crowd): ``-<handle>`` (a negative integer), the crowd's
  list handle, assigned once by the rule store when the crowd is created and never reused;
* **legacy fields** of the layout before issue 14 (one record per crowd): ``seller * 4 + kind``
  (kind 1..3) or ``a|o|p<seller_id>``. Writers convert them (see below); readers accept them
  until the migration marker is set.

Fact value (binary, big-endian; whole seconds since 1970 unless said otherwise)::

    flags:u8            bit 0 follow part present, bit 1 it is an unfollow (tombstone),
                        bit 2 purchase part present (no other bit; at least one part)
    follow part:        expires_s:u32, version:u40 (ms since EPOCH_MS), since_s:u32 (absent
                        for a tombstone)
    purchase part:      expires_s:u32, count:u16, last_s:u32 (0 = time unknown)

14 bytes for a follow, 24 with purchases. Each part is merged on its own, order-independently:

* **follow** - last writer wins by the time of the fact: the part greater in the order
  ``(version, tombstone, expires, since)`` wins (a newer fact wins; on equal times the
  unfollow wins; on equal state the later expiry, then the later - more cautious - since).
  ``since`` is when the current follow began: a follow event's own time, or the snapshot's
  ``followed_at``. **Exact in real time.**
* **purchases** - a monotone merge: the maximum of the expiries, of the counts and of the last
  purchase times. A purchase event says "count >= 1, last purchase at t", a snapshot row
  "count = N as of the cut" (and ``last_purchase_at`` when the export has it). So *at least one
  purchase* and *the last purchase time* are **exact in real time** (for the events of the
  last membership TTL); *counts above one* are exact only **as of the last snapshot** (purchase
  events can be redelivered, so they are never added up), and a count never goes down until
  its part expires (a refund does not lower it).

Times are kept to the second: ``since`` and expiries are rounded up, the last purchase time
down, so a predicate's day boundaries move by at most a second: "followed >= 30 days" turns true
up to a second late, "followed <= 7 days" false up to a second late, "bought within 7 days"
false up to a second early.

List value: one decimal integer (an int64 in the listpack, 10 bytes)::

    value = (version_ms - EPOCH_MS) * 10**7 + ttl_s * 2 + removed

Newest change wins (``(version, removed, expiry)``: on equal times the removal). An add has
``ttl_s = 0``: it never expires; a removal is a tombstone that lives ``ttl_s`` (the unfollow
tombstone TTL), so a list file older than it cannot bring the buyer back. Legacy records use
the same integer with ``tombstone`` for ``removed`` and ``expires = version + ttl_s``.

Writes (:data:`~pricing_service.membership.lua.APPLY_LUA`: one call per buyer, the call's
writes in order; ARGV = now, the old-fan threshold of the legacy layout, then (field, value)
pairs): first every expired part and every expired or corrupt field of the buyer is dropped,
and every legacy field converted into the fact field of its seller (all_fans -> the follow
part; since = old_fans' version minus the old-fan threshold when old_fans was a live member,
else all_fans' version; purchased_fans -> count 1, time unknown), then each write is merged
into its field. The key's PEXPIREAT is the latest expiry of any live part, or none while the
buyer is on a list (adds never expire). Every merge is commutative, associative and
idempotent, so replays and any arrival order end in one state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pricing_service.domain import Crowd, CrowdKind

EPOCH_MS: Final = 1_704_067_200_000  # 2024-01-01T00:00:00Z
LOW: Final = 10**7
MAX_TTL_S: Final = (LOW - 1) // 2  # 4,999,999 s, about 57.8 days
MAX_VERSION_MS: Final = EPOCH_MS + (2**63 - 1) // LOW - 1  # about 2053
#: Expiry of what never expires (a list add).
NEVER_MS: Final = 2**62
#: The layout's largest purchase count (a bigger count is kept as this: "at least").
MAX_COUNT: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
#: The value of the migration marker.
LAYOUT_VERSION: Final = "2"

F_FOLLOW: Final = 1
F_TOMBSTONE: Final = 2
F_PURCHASES: Final = 4

_KIND_LETTER: Final = {
    CrowdKind.ALL_FANS: "a",
    CrowdKind.OLD_FANS: "o",
    CrowdKind.PURCHASED_FANS: "p",
}
_LETTER_KIND: Final = {v: k for k, v in _KIND_LETTER.items()}
_NUMERIC_SELLER = re.compile(r"[1-9][0-9]{0,14}")
_NUMERIC_FIELD = re.compile(r"[1-9][0-9]*")
_LIST_FIELD = re.compile(r"-[1-9][0-9]{0,14}")
#: A well-formed decimal value: a canonical positive decimal of 8 to 19 digits fitting an int64.
_VALUE = re.compile(rb"[1-9][0-9]{7,18}")
_INT64_MAX: Final = 2**63 - 1


class LayoutError(ValueError):
    """A value cannot be represented in (or decoded from) the layout."""


def _ceil_s(ms: int) -> int:
    return -(-ms // 1000)


# --- decoded values -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Follow:
    """The follow part of a fact field: the last follow or unfollow, by the time of the fact."""

    version_ms: int
    tombstone: bool
    expires_ms: int
    #: when the current follow began (0 for a tombstone)
    since_ms: int = 0

    def order(self) -> tuple[int, bool, int, int]:
        return (self.version_ms, self.tombstone, self.expires_ms, self.since_ms)


@dataclass(frozen=True, slots=True)
class Purchases:
    """The purchase part of a fact field (merged by maxima)."""

    expires_ms: int
    count: int
    #: time of the last purchase known, 0 = unknown
    last_ms: int = 0


@dataclass(frozen=True, slots=True)
class Facts:
    """What Redis knows about one (buyer, seller) relation."""

    follow: Follow | None = None
    purchases: Purchases | None = None

    def live(self, now_ms: int) -> Facts | None:
        """The parts not expired at ``now_ms`` (``None`` when none is left)."""
        f, p = self.follow, self.purchases
        if f is not None and f.expires_ms <= now_ms:
            f = None
        if p is not None and p.expires_ms <= now_ms:
            p = None
        if f is None and p is None:
            return None
        if f is self.follow and p is self.purchases:
            return self
        return Facts(f, p)

    def expires_ms(self) -> int:
        return max(
            self.follow.expires_ms if self.follow is not None else -1,
            self.purchases.expires_ms if self.purchases is not None else -1,
        )


@dataclass(frozen=True, slots=True)
class ListEntry:
    """A buyer's latest change on one list crowd."""

    version_ms: int
    removed: bool
    #: :data:`NEVER_MS` for an add
    expires_ms: int

    def is_member(self, now_ms: int) -> bool:
        return not self.removed and self.expires_ms > now_ms

    def order(self) -> tuple[int, bool, int]:
        return (self.version_ms, self.removed, self.expires_ms)


@dataclass(frozen=True, slots=True)
class Record:
    """One (buyer, crowd) record of the legacy layout (one record per crowd kind)."""

    tombstone: bool
    version_ms: int
    expires_ms: int

    def is_member(self, now_ms: int) -> bool:
        return not self.tombstone and self.expires_ms > now_ms

    def is_live(self, now_ms: int) -> bool:
        return self.expires_ms > now_ms


# --- merges (the write script, pricing_service.membership.lua, does exactly the same) -------------
def merge_facts(a: Facts | None, b: Facts | None, now_ms: int) -> Facts | None:
    """The merge of two fact records, after dropping their parts expired at ``now_ms``."""
    a = a.live(now_ms) if a is not None else None
    b = b.live(now_ms) if b is not None else None
    if a is None or b is None:
        return a if b is None else b
    fa, fb = a.follow, b.follow
    if fa is None or fb is None:
        follow = fa if fb is None else fb
    else:
        follow = fb if fb.order() > fa.order() else fa
    pa, pb = a.purchases, b.purchases
    if pa is None or pb is None:
        purchases = pa if pb is None else pb
    else:
        purchases = Purchases(
            max(pa.expires_ms, pb.expires_ms), max(pa.count, pb.count), max(pa.last_ms, pb.last_ms)
        )
    return Facts(follow, purchases)


def legacy_facts(
    all_fans: Record | None,
    old_fans: Record | None,
    purchased: Record | None,
    old_fan_min_ms: int,
    now_ms: int,
) -> Facts | None:
    """The facts the three legacy records of one (buyer, seller) certify, at stored precision.

    all_fans gives the follow part; a live old_fans member certifies that the buyer followed at
    or before ``old_fans.version - old_fan_min_ms`` (otherwise the follow is taken to have begun
    at all_fans' own version, the latest it can have); a live purchased_fans member gives one
    purchase of unknown time. Expired records and old_fans/purchased_fans tombstones say
    nothing. The built-in crowds read from the result answer as the legacy records did.
    """

    def live(r: Record | None) -> Record | None:
        return r if r is not None and r.expires_ms > now_ms else None

    a, o, p = live(all_fans), live(old_fans), live(purchased)
    follow = None
    if a is not None:
        since = 0
        if not a.tombstone:
            since = a.version_ms
            if o is not None and not o.tombstone:
                since = min(o.version_ms - old_fan_min_ms, a.version_ms)
            since = min(max(_ceil_s(since), 0), _U32) * 1000
        follow = Follow(a.version_ms, a.tombstone, _ceil_s(a.expires_ms) * 1000, since)
    purchases = None
    if p is not None and not p.tombstone:
        purchases = Purchases(_ceil_s(p.expires_ms) * 1000, 1, 0)
    if follow is None and purchases is None:
        return None
    return Facts(follow, purchases)


class MembershipLayout:
    """Key names and encodings, bound to a namespace prefix."""

    __slots__ = ("_user_prefix", "namespace")

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        self._user_prefix = f"{namespace}cm:{{"

    # --- keys -------------------------------------------------------------------------------
    def user_key(self, user_id: str) -> str:
        return f"{self._user_prefix}{user_id}}}"

    def user_key_pattern(self) -> str:
        """SCAN pattern matching every buyer hash of this namespace."""
        return f"{self._user_prefix}*"

    def user_from_key(self, key: str) -> str:
        if not key.startswith(self._user_prefix) or not key.endswith("}"):
            raise LayoutError(f"not a membership key: {key!r}")
        return key[len(self._user_prefix) : -1]

    @property
    def watermark_key(self) -> str:
        return f"{self.namespace}sync:watermark"

    def snapshot_checkpoint_key(self, snapshot_id: str) -> str:
        return f"{self.namespace}sync:snapshot:{{{snapshot_id}}}"

    def list_checkpoint_key(self, load_id: str) -> str:
        return f"{self.namespace}sync:list:{{{load_id}}}"

    @property
    def crowd_lists_key(self) -> str:
        return f"{self.namespace}crowd-lists"

    @property
    def layout_version_key(self) -> str:
        return f"{self.namespace}membership:layout"

    @staticmethod
    def crowd_list_name(seller_id: str, crowd_id: str) -> str:
        """The registry field of a list crowd."""
        return f"sellers/{seller_id}/crowds/{crowd_id}"

    # --- fields -------------------------------------------------------------------------------
    @staticmethod
    def fact_field(seller_id: str) -> str:
        if _NUMERIC_SELLER.fullmatch(seller_id):
            return str(int(seller_id) * 4)
        return "f" + seller_id

    @staticmethod
    def list_field(handle: int) -> str:
        if not 0 < handle < 10**15:
            raise LayoutError(f"list handle {handle} out of range")
        return f"-{handle}"

    @staticmethod
    def crowd_field(crowd: Crowd) -> str:
        """The legacy field of a built-in crowd (the layout before issue 14)."""
        s = crowd.seller_id
        if crowd.kind not in _KIND_LETTER:
            raise LayoutError(f"{crowd} has no legacy field")
        if _NUMERIC_SELLER.fullmatch(s):
            return str(int(s) * 4 + int(crowd.kind))
        return _KIND_LETTER[crowd.kind] + s

    @classmethod
    def legacy_fields(cls, seller_id: str) -> tuple[str, str, str]:
        """The legacy all_fans, old_fans and purchased_fans fields of a seller."""
        return (
            cls.crowd_field(Crowd(seller_id, CrowdKind.ALL_FANS)),
            cls.crowd_field(Crowd(seller_id, CrowdKind.OLD_FANS)),
            cls.crowd_field(Crowd(seller_id, CrowdKind.PURCHASED_FANS)),
        )

    @staticmethod
    def parse_field(field: str | bytes) -> tuple[str, str | int | Crowd]:
        """``("facts", seller_id)``, ``("list", handle)`` or ``("legacy", Crowd)``."""
        try:
            f = field.decode() if isinstance(field, bytes) else field
        except UnicodeDecodeError:
            raise LayoutError(f"bad field {field!r}") from None
        if not f:
            raise LayoutError("empty field")
        if f[0] == "-":
            if not _LIST_FIELD.fullmatch(f):
                raise LayoutError(f"bad list field {f!r}")
            return ("list", int(f[1:]))
        if "0" <= f[0] <= "9":
            if not _NUMERIC_FIELD.fullmatch(f):
                raise LayoutError(f"bad field {f!r}")
            seller, code = divmod(int(f), 4)
            if seller == 0 or not _NUMERIC_SELLER.fullmatch(str(seller)):
                raise LayoutError(f"bad field {f!r}")
            if code == 0:
                return ("facts", str(seller))
            return ("legacy", Crowd(str(seller), CrowdKind(code)))
        if f[0] == "f":
            return ("facts", f[1:])
        kind = _LETTER_KIND.get(f[0])
        if kind is None:
            raise LayoutError(f"bad field {f!r}")
        return ("legacy", Crowd(f[1:], kind))

    @classmethod
    def field_crowd(cls, field: str | bytes) -> Crowd:
        """The crowd of a legacy field."""
        kind, what = cls.parse_field(field)
        if kind != "legacy" or not isinstance(what, Crowd):
            raise LayoutError(f"not a legacy crowd field: {field!r}")
        return what

    # --- fact values --------------------------------------------------------------------------
    @staticmethod
    def encode_facts(facts: Facts) -> bytes:
        """The stored value: times rounded to whole seconds (see the module docstring)."""
        f, p = facts.follow, facts.purchases
        if f is None and p is None:
            raise LayoutError("a fact value needs a follow or a purchase part")
        flags = 0
        out = b""
        if f is not None:
            if f.version_ms <= EPOCH_MS or f.version_ms > MAX_VERSION_MS:
                raise LayoutError(f"version {f.version_ms} ms is outside the layout's time range")
            flags |= F_FOLLOW
            out += min(max(_ceil_s(f.expires_ms), 0), _U32).to_bytes(4, "big")
            out += (f.version_ms - EPOCH_MS).to_bytes(5, "big")
            if f.tombstone:
                flags |= F_TOMBSTONE
            else:
                out += min(max(_ceil_s(f.since_ms), 0), _U32).to_bytes(4, "big")
        if p is not None:
            if p.count < 1:
                raise LayoutError("a purchase part needs a count of at least 1")
            flags |= F_PURCHASES
            out += min(max(_ceil_s(p.expires_ms), 0), _U32).to_bytes(4, "big")
            out += min(p.count, MAX_COUNT).to_bytes(2, "big")
            out += min(max(p.last_ms // 1000, 0), _U32).to_bytes(4, "big")
        return bytes((flags,)) + out

    @staticmethod
    def decode_facts(value: bytes) -> Facts:
        """Parse a fact value; anything the Lua script's ``fparse`` refuses is a LayoutError."""
        n = len(value)
        if n < 10:
            raise LayoutError(f"bad fact value {value!r}")
        flags = value[0]
        has_f, tomb, has_p = flags & F_FOLLOW, flags & F_TOMBSTONE, flags & F_PURCHASES
        want = 1 + ((9 if tomb else 13) if has_f else 0) + (10 if has_p else 0)
        if flags > 7 or (tomb and not has_f) or not (has_f or has_p) or n != want:
            raise LayoutError(f"bad fact value {value!r}")
        follow = purchases = None
        pos = 1
        if has_f:
            version = int.from_bytes(value[5:10], "big")
            if version == 0:
                raise LayoutError(f"bad fact value {value!r}")
            since = 0 if tomb else int.from_bytes(value[10:14], "big") * 1000
            follow = Follow(
                version + EPOCH_MS, bool(tomb), int.from_bytes(value[1:5], "big") * 1000, since
            )
            pos = 10 if tomb else 14
        if has_p:
            count = int.from_bytes(value[pos + 4 : pos + 6], "big")
            if count == 0:
                raise LayoutError(f"bad fact value {value!r}")
            purchases = Purchases(
                int.from_bytes(value[pos : pos + 4], "big") * 1000,
                count,
                int.from_bytes(value[pos + 6 : pos + 10], "big") * 1000,
            )
        return Facts(follow, purchases)

    # --- decimal values (list entries, legacy records) ------------------------------------------
    @staticmethod
    def encode(version_ms: int, expires_ms: int, *, tombstone: bool) -> str:
        """A legacy record's value (also a list removal's: ``tombstone`` = removed)."""
        if version_ms <= EPOCH_MS or version_ms > MAX_VERSION_MS:
            raise LayoutError(f"version {version_ms} ms is outside the layout's time range")
        ttl_s = max(-((version_ms - expires_ms) // 1000), 0)  # ceil, in integers
        if ttl_s > MAX_TTL_S:
            raise LayoutError(f"ttl {ttl_s}s exceeds the layout maximum of {MAX_TTL_S}s")
        return str((version_ms - EPOCH_MS) * LOW + ttl_s * 2 + (1 if tombstone else 0))

    @staticmethod
    def _decimal(value: str | bytes | int) -> tuple[int, int, bool]:
        if isinstance(value, int):
            raw = str(value).encode()
        elif isinstance(value, str):
            raw = value.encode("utf-8", "replace")
        else:
            raw = value
        if not _VALUE.fullmatch(raw) or (n := int(raw)) > _INT64_MAX:
            raise LayoutError(f"bad membership value {value!r}")
        off, low = divmod(n, LOW)
        return EPOCH_MS + off, low >> 1, bool(low & 1)

    @classmethod
    def decode(cls, value: str | bytes | int) -> Record:
        """A legacy record; anything but a canonical in-range decimal is a LayoutError."""
        version, ttl_s, tomb = cls._decimal(value)
        return Record(tombstone=tomb, version_ms=version, expires_ms=version + ttl_s * 1000)

    @classmethod
    def encode_list(cls, version_ms: int, *, removed: bool, ttl_s: int = 0) -> str:
        """A list entry: an add (``ttl_s`` 0: never expires) or a removal living ``ttl_s``."""
        if removed and ttl_s <= 0:
            raise LayoutError("a removal needs a lifetime (the tombstone TTL)")
        if not 0 <= ttl_s <= MAX_TTL_S:
            raise LayoutError(f"ttl {ttl_s}s outside 0..{MAX_TTL_S}")
        return cls.encode(version_ms, version_ms + ttl_s * 1000, tombstone=removed)

    @classmethod
    def decode_list(cls, value: str | bytes | int) -> ListEntry:
        version, ttl_s, removed = cls._decimal(value)
        return ListEntry(version, removed, version + ttl_s * 1000 if ttl_s else NEVER_MS)
