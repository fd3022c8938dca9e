"""The Redis layout of crowd membership: the only module that knows key names and encodings.

Both ``pricing_service`` and ``sync_worker`` import this module; nothing else touches these keys.

Keys (``<ns>`` is ``PRICING_REDIS_NAMESPACE``, empty by default):

* ``<ns>cm:{<user_id>}`` - one hash per buyer. The braces are a Redis Cluster hash tag, so every
  record of a buyer lives in one slot: a page's lookup is one ``HMGET`` and every write is one
  single-key Lua call, on standalone Redis and on Redis Cluster alike.
* ``<ns>sync:watermark`` - the stream consumer's watermark (ms): every event published before it
  has been applied.
* ``<ns>sync:snapshot:{<snapshot_id>}`` - snapshot loader checkpoints (hash: part -> rows done).

Hash field = the crowd, compactly: for a canonical numeric seller id (``[1-9][0-9]{0,14}``) the
decimal integer ``seller * 4 + kind`` (Redis stores it as an integer inside the listpack); any
other seller id is ``<kind letter><seller_id>`` with letters ``a``/``o``/``p``. A field that starts
with a digit is numeric, so the two forms never collide.

Hash value = one decimal integer (stored as a 64-bit integer in the listpack, 10 bytes)::

    value = (version_ms - EPOCH_MS) * 10**7 + ttl_s * 2 + tombstone

``version_ms`` is the time of the fact (event ``occurred_at`` or snapshot cut), ``ttl_s`` the
seconds from the fact to the record's expiry (``expires_ms = version_ms + ttl_s * 1000``, at most
:data:`MAX_TTL_S`), ``tombstone`` 1 for an unfollow's tombstone. Versions must fall between
:data:`EPOCH_MS` (2024-01-01) and about 2053; a fact older than the epoch is long expired anyway.
The Lua script compares records with Lua doubles, which are exact below 2**53: it splits the
decimal string instead of doing 64-bit arithmetic. Expiries are whole seconds after the version
(a requested expiry is rounded *up* to the next second). A value that is not a canonical decimal
of 8..19 digits fitting an int64 is corrupt: reads treat it as absent, the next write drops it.

Writes (:data:`APPLY_LUA`, or :data:`APPLY_SAME_VALUE_LUA` for a snapshot's writes that share one
value; one call per buyer, all of a call's writes in order): first every
expired (``expires <= now``) or corrupt field of the buyer is dropped; a conditional write
(purchase) applies only while its condition crowd is a live member record; a write applies when
there is no record or it is greater in the order ``(version, tombstone, expiry)``; an applied
record that is already expired is removed; the key's PEXPIREAT is the latest live field expiry.
The order is total, so replays and any arrival order of unconditional writes end in one state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pricing_service.domain import Crowd, CrowdKind

EPOCH_MS: Final = 1_704_067_200_000  # 2024-01-01T00:00:00Z
LOW: Final = 10**7
MAX_TTL_S: Final = (LOW - 1) // 2  # 4,999,999 s, about 57.8 days
MAX_VERSION_MS: Final = EPOCH_MS + (2**63 - 1) // LOW - 1

_KIND_LETTER: Final = {
    CrowdKind.ALL_FANS: "a",
    CrowdKind.OLD_FANS: "o",
    CrowdKind.PURCHASED_FANS: "p",
}
_LETTER_KIND: Final = {v: k for k, v in _KIND_LETTER.items()}
_NUMERIC_SELLER = re.compile(r"[1-9][0-9]{0,14}")
_NUMERIC_FIELD = re.compile(r"[1-9][0-9]*")
#: A well-formed value: a canonical positive decimal of 8 to 19 digits that fits an int64.
_VALUE = re.compile(rb"[1-9][0-9]{7,18}")
_INT64_MAX: Final = 2**63 - 1


class LayoutError(ValueError):
    """A value cannot be represented in (or decoded from) the layout."""


@dataclass(frozen=True, slots=True)
class Record:
    """One (buyer, crowd) membership record as stored."""

    tombstone: bool
    version_ms: int
    expires_ms: int

    def is_member(self, now_ms: int) -> bool:
        return not self.tombstone and self.expires_ms > now_ms

    def is_live(self, now_ms: int) -> bool:
        return self.expires_ms > now_ms


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

    # --- fields -------------------------------------------------------------------------------
    @staticmethod
    def crowd_field(crowd: Crowd) -> str:
        s = crowd.seller_id
        if _NUMERIC_SELLER.fullmatch(s):
            return str(int(s) * 4 + int(crowd.kind))
        return _KIND_LETTER[crowd.kind] + s

    @staticmethod
    def field_crowd(field: str | bytes) -> Crowd:
        try:
            f = field.decode() if isinstance(field, bytes) else field
        except UnicodeDecodeError:
            raise LayoutError(f"bad crowd field {field!r}") from None
        if not f:
            raise LayoutError("empty crowd field")
        if "0" <= f[0] <= "9":
            if not _NUMERIC_FIELD.fullmatch(f):
                raise LayoutError(f"bad crowd field {f!r}")
            seller, code = divmod(int(f), 4)
            if code == 0 or seller == 0 or not _NUMERIC_SELLER.fullmatch(str(seller)):
                raise LayoutError(f"bad crowd field {f!r}")
            return Crowd(str(seller), CrowdKind(code))
        kind = _LETTER_KIND.get(f[0])
        if kind is None:
            raise LayoutError(f"bad crowd field {f!r}")
        return Crowd(f[1:], kind)

    # --- values -------------------------------------------------------------------------------
    @staticmethod
    def encode(version_ms: int, expires_ms: int, *, tombstone: bool) -> str:
        if version_ms <= EPOCH_MS or version_ms > MAX_VERSION_MS:
            raise LayoutError(f"version {version_ms} ms is outside the layout's time range")
        ttl_s = max(-((version_ms - expires_ms) // 1000), 0)  # ceil, in integers
        if ttl_s > MAX_TTL_S:
            raise LayoutError(f"ttl {ttl_s}s exceeds the layout maximum of {MAX_TTL_S}s")
        return str((version_ms - EPOCH_MS) * LOW + ttl_s * 2 + (1 if tombstone else 0))

    @staticmethod
    def decode(value: str | bytes | int) -> Record:
        """Parse a stored value; anything but a canonical in-range decimal is a LayoutError.

        Exactly the values the Lua script's ``parse`` accepts (the two must agree).
        """
        if isinstance(value, int):
            raw = str(value).encode()
        elif isinstance(value, str):
            raw = value.encode("utf-8", "replace")
        else:
            raw = value
        if not _VALUE.fullmatch(raw) or (n := int(raw)) > _INT64_MAX:
            raise LayoutError(f"bad membership value {value!r}")
        off, low = divmod(n, LOW)
        version = EPOCH_MS + off
        return Record(
            tombstone=bool(low & 1), version_ms=version, expires_ms=version + (low >> 1) * 1000
        )


# The write script in three parts: the head reads the buyer's hash (dropping expired and
# undecodable fields), a loop applies the call's writes, the tail writes the result back.
# The two scripts below share head and tail and differ only in how ARGV carries the writes.
_APPLY_HEAD: Final = """local EPOCH_MS = %EPOCH%
local key = KEYS[1]
local now = tonumber(ARGV[1])
local raw = redis.call('HGETALL', key)
local cur = {}
local drop = {}
local function parse(v)
  local n = #v
  if n < 8 or n > 19 or string.find(v, '^[1-9]%d*$') == nil then return nil end
  if n == 19 and v > '9223372036854775807' then return nil end
  local ver = tonumber(string.sub(v, 1, n - 7))
  local low = tonumber(string.sub(v, n - 6))
  if ver == nil or low == nil then return nil end
  local tomb = low % 2
  return ver, tomb, ver + (low - tomb) / 2 * 1000
end
-- value -> {ver, tomb, exp, value}, parsed once per distinct value and shared by every field
-- holding it (records are immutable): the fields a snapshot wrote all hold the same value
local parsed = {}
local function record(v)
  local p = parsed[v]
  if p == nil then
    local pv, pt, pe = parse(v)
    p = {pv, pt, pe, v}
    parsed[v] = p
  end
  return p
end
for i = 1, #raw, 2 do
  local p = record(raw[i + 1])
  if p[1] == nil or p[3] <= now then
    drop[#drop + 1] = raw[i]
  else
    cur[raw[i]] = p
  end
end
local applied, stale, unmet = 0, 0, 0
local touched = {}
"""
# One write (record p = {ver, tomb, exp, value} to field f), the rule both scripts share: an
# undecodable value is stale; a record applies when the field has none or it is greater in the
# order (version, tombstone, expiry); an applied record already expired removes the field.
_APPLY_ONE: Final = """  if ver == nil then
    stale = stale + 1
  elseif old ~= nil and not (ver > old[1] or (ver == old[1] and (tomb > old[2]
      or (tomb == old[2] and exp > old[3])))) then
    stale = stale + 1
  else
    applied = applied + 1
    touched[f] = true
    if exp <= now then cur[f] = nil else cur[f] = p end
  end
"""
_APPLY_TRIPLES: Final = (
    """for i = 2, #ARGV, 3 do
  local f, v, c = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local p = record(v)
  local ver, tomb, exp = p[1], p[2], p[3]
  local old = cur[f]
  local cond = nil
  if c ~= '' then cond = cur[c] end
  if ver ~= nil and c ~= '' and (cond == nil or cond[2] == 1) then
    unmet = unmet + 1
  else
"""
    + _APPLY_ONE
    + """  end
end
"""
)
_APPLY_SAME_VALUE: Final = (
    """local p = record(ARGV[2])
local ver, tomb, exp = p[1], p[2], p[3]
for i = 3, #ARGV do
  local f = ARGV[i]
  local old = cur[f]
"""
    + _APPLY_ONE
    + """end
"""
)
_APPLY_TAIL: Final = """local del = {}
for i = 1, #drop do
  if touched[drop[i]] == nil then del[#del + 1] = drop[i] end
end
local maxexp = -1
for f, rec in pairs(cur) do
  if rec[3] > maxexp then maxexp = rec[3] end
end
local set = {}
for f, _ in pairs(touched) do
  local rec = cur[f]
  if rec == nil then del[#del + 1] = f else set[#set + 1] = f; set[#set + 1] = rec[4] end
end
-- one HDEL and one HSET per chunk (unpack is limited to a few thousand values)
for i = 1, #del, 4000 do
  redis.call('HDEL', key, unpack(del, i, math.min(i + 3999, #del)))
end
for i = 1, #set, 4000 do
  redis.call('HSET', key, unpack(set, i, math.min(i + 3999, #set)))
end
if maxexp >= 0 then
  redis.call('PEXPIREAT', key, string.format('%.0f', maxexp + EPOCH_MS))
end
return {applied, stale, unmet}
"""

#: Atomic last-writer-wins upsert of one buyer's records.
#: KEYS[1] = buyer hash; ARGV[1] = now (ms since EPOCH_MS);
#: then triples: field, encoded value, condition field ('' = none: else the write applies only
#: while that field is a live member, e.g. purchased_fans needs a current all_fans).
#: Expired and undecodable fields are dropped first; a write applies only if it is greater in the
#: order (version, tombstone, expiry): a newer version wins, on equal versions the tombstone wins,
#: and on equal version and state the later expiry wins (so the result never depends on arrival
#: order). A winning record that is already expired is deleted; the key expires at the latest
#: remaining field expiry. Returns {applied, stale, condition_unmet}.
APPLY_LUA: Final = (_APPLY_HEAD + _APPLY_TRIPLES + _APPLY_TAIL).replace("%EPOCH%", str(EPOCH_MS))

#: :data:`APPLY_LUA` for writes that all carry one value and no condition (a snapshot's: every
#: write has the cut as version and the same expiry): ARGV[1] = now, ARGV[2] = the encoded
#: value, then the fields. Same result as APPLY_LUA with triples (field, value, ''), for a third
#: of the arguments (Redis parses, and Lua interns, one string per membership instead of three).
APPLY_SAME_VALUE_LUA: Final = (_APPLY_HEAD + _APPLY_SAME_VALUE + _APPLY_TAIL).replace(
    "%EPOCH%", str(EPOCH_MS)
)
