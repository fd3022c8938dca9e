"""The membership layout before issue 14 (one record per crowd), frozen: for the migration tests
and for ``bench.memory``'s side-by-side measurement. Nothing in the service writes it any more;
the service reads it (:func:`pricing_service.membership.layout.legacy_facts`) until the
migration marker is set.

The write script is main's ``APPLY_LUA`` at aabd382, unchanged; the derivation is main's
(``derive.follow`` / ``unfollow`` / ``purchase`` / ``snapshot_row``), as Lua ARGV triples
``(field, value, condition field)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import redis.asyncio as aioredis

from pricing_service.domain import Crowd, CrowdKind
from pricing_service.membership.derive import Ttls
from pricing_service.membership.layout import EPOCH_MS, MembershipLayout

Triple = tuple[str, str, str]
L = MembershipLayout

_LEGACY_HEAD: Final = """local EPOCH_MS = %EPOCH%
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
_LEGACY_ONE: Final = """  if ver == nil then
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
_LEGACY_TRIPLES: Final = (
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
    + _LEGACY_ONE
    + """  end
end
"""
)
_LEGACY_SAME_VALUE: Final = (
    """local p = record(ARGV[2])
local ver, tomb, exp = p[1], p[2], p[3]
for i = 3, #ARGV do
  local f = ARGV[i]
  local old = cur[f]
"""
    + _LEGACY_ONE
    + """end
"""
)
_LEGACY_TAIL: Final = """local del = {}
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

LEGACY_APPLY_LUA: Final = (_LEGACY_HEAD + _LEGACY_TRIPLES + _LEGACY_TAIL).replace(
    "%EPOCH%", str(EPOCH_MS)
)


def _field(seller: str, kind: CrowdKind) -> str:
    return L.crowd_field(Crowd(seller, kind))


def follow(seller: str, at_ms: int, ttls: Ttls) -> list[Triple]:
    return [(_field(seller, CrowdKind.ALL_FANS),
             L.encode(at_ms, at_ms + ttls.membership_ms, tombstone=False), "")]  # fmt: skip


def unfollow(seller: str, at_ms: int, ttls: Ttls) -> list[Triple]:
    value = L.encode(at_ms, at_ms + ttls.tombstone_ms, tombstone=True)
    return [
        (_field(seller, k), value, "")
        for k in (CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS)
    ]


def purchase(seller: str, at_ms: int, ttls: Ttls) -> list[Triple]:
    """The conditional write of the defect: applies only while the buyer is an all_fans member."""
    return [(_field(seller, CrowdKind.PURCHASED_FANS),
             L.encode(at_ms, at_ms + ttls.membership_ms, tombstone=False),
             _field(seller, CrowdKind.ALL_FANS))]  # fmt: skip


def snapshot_row(
    seller: str, followed_at_ms: int, purchase_count: int, cut_ms: int, ttls: Ttls
) -> list[Triple]:
    value = L.encode(cut_ms, cut_ms + ttls.membership_ms, tombstone=False)
    kinds = [CrowdKind.ALL_FANS]
    if followed_at_ms <= cut_ms - ttls.old_fan_min_ms:
        kinds.append(CrowdKind.OLD_FANS)
    if purchase_count >= 1:
        kinds.append(CrowdKind.PURCHASED_FANS)
    return [(_field(seller, k), value, "") for k in kinds]


class LegacyWriter:
    """Writes buyer hashes exactly as the sync worker of aabd382 did (one EVALSHA per buyer)."""

    def __init__(self, redis: aioredis.Redis, namespace: str = "") -> None:
        self.redis = redis
        self.layout = MembershipLayout(namespace)
        self._sha: str | None = None

    async def apply(self, by_user: Mapping[str, Iterable[Triple]], now_ms: int) -> int:
        """Returns the writes applied."""
        if self._sha is None:
            sha = await self.redis.script_load(LEGACY_APPLY_LUA)
            self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        pipe = self.redis.pipeline(transaction=False)
        for user, triples in by_user.items():
            args = [a for t in triples for a in t]
            pipe.evalsha(self._sha, 1, self.layout.user_key(user), str(now_ms - EPOCH_MS), *args)
        return sum(int(r[0]) for r in await pipe.execute())
