"""The Lua scripts of the membership layout: the write script and the list crowd registry's.

The write script is the Redis side of :mod:`pricing_service.membership.layout`: it decodes,
merges and encodes exactly as the layout's Python codecs do (the layout's docstring is the
contract both follow; the model tests hold them to each other). Kept apart from the codecs so
that the layout module stays readable as the contract.
"""

from __future__ import annotations

from typing import Final

from pricing_service.membership.layout import EPOCH_MS

# --- the write script -------------------------------------------------------------------------
# Numbers in Lua are doubles (exact below 2**53): times are ms since 1970 (< 2**42) or seconds.
# ``struct`` is the C library Redis embeds; Lua's string comparison is locale-dependent, so
# binary values are never compared as strings, only their decoded numbers.
_APPLY: Final = r"""
local EPOCH = %EPOCH%
local key = KEYS[1]
local now = tonumber(ARGV[1])
local old_min = tonumber(ARGV[2])
local NEVER = 2^62
local raw = redis.call('HGETALL', key)
local facts, lists, legacy, drop, touched = {}, {}, {}, {}, {}
local band = bit.band

-- decimal values: version (ms), ttl (s), flag (removed / tombstone); nil when not canonical
local function dec(v)
  local n = #v
  if n < 8 or n > 19 or string.find(v, '^[1-9]%d*$') == nil then return nil end
  if n == 19 and v > '9223372036854775807' then return nil end
  local hi = tonumber(string.sub(v, 1, n - 7))
  local lo = tonumber(string.sub(v, n - 6))
  if hi == nil or lo == nil then return nil end
  local flag = lo % 2
  return hi + EPOCH, (lo - flag) / 2, flag
end

-- fact values -> {fv = version offset, ft = tombstone, fe = expires_s, fs = since_s,
-- pe = expires_s, pc = count, pl = last_s} (fv / pe nil: no such part); nil when corrupt
local function fparse(v)
  local n = #v
  if n < 10 then return nil end
  local fl = string.byte(v, 1)
  local F, T, P = band(fl, 1), band(fl, 2), band(fl, 4)
  if fl > 7 or (F == 0 and T ~= 0) or (F == 0 and P == 0) then return nil end
  local want = 1
  if F ~= 0 then if T ~= 0 then want = want + 9 else want = want + 13 end end
  if P ~= 0 then want = want + 10 end
  if n ~= want then return nil end
  local r = {}
  local pos = 2
  if F ~= 0 then
    r.fe, r.fv, pos = struct.unpack('>I4I5', v, pos)
    if r.fv == 0 then return nil end
    if T ~= 0 then r.ft = 1; r.fs = 0 else r.ft = 0; r.fs, pos = struct.unpack('>I4', v, pos) end
  end
  if P ~= 0 then
    r.pe, r.pc, r.pl = struct.unpack('>I4I2I4', v, pos)
    if r.pc == 0 then return nil end
  end
  return r
end

-- drop the parts expired at now; returns the record (nil when empty) and whether it changed
local function live(r)
  local changed = false
  if r.fv ~= nil and r.fe * 1000 <= now then r.fv = nil; changed = true end
  if r.pe ~= nil and r.pe * 1000 <= now then r.pe = nil; changed = true end
  if r.fv == nil and r.pe == nil then return nil, true end
  return r, changed
end

-- the merge of two records; also 1 when it equals a, 2 when it equals b (nothing to encode)
local function fmerge(a, b)
  if a == nil then return b, 2 end
  if b == nil then return a, 1 end
  local m = {}
  local s = a
  if a.fv == nil then s = b
  elseif b.fv ~= nil and (b.fv > a.fv or (b.fv == a.fv and (b.ft > a.ft or (b.ft == a.ft
      and (b.fe > a.fe or (b.fe == a.fe and b.fs > a.fs)))))) then s = b end
  if s.fv ~= nil then m.fv, m.ft, m.fe, m.fs = s.fv, s.ft, s.fe, s.fs end
  local pa, pb = false, false  -- the purchase part equals a's, b's
  if a.pe ~= nil and b.pe ~= nil then
    m.pe, m.pc, m.pl = math.max(a.pe, b.pe), math.max(a.pc, b.pc), math.max(a.pl, b.pl)
    pa = m.pe == a.pe and m.pc == a.pc and m.pl == a.pl
    pb = m.pe == b.pe and m.pc == b.pc and m.pl == b.pl
  elseif a.pe ~= nil then m.pe, m.pc, m.pl = a.pe, a.pc, a.pl; pa = true
  elseif b.pe ~= nil then m.pe, m.pc, m.pl = b.pe, b.pc, b.pl; pb = true
  else pa, pb = true, true end
  local fa = s == a or (a.fv == nil and b.fv == nil)
  local fb = s == b or (a.fv == nil and b.fv == nil)
  if fa and pa then return a, 1 end
  if fb and pb then return b, 2 end
  return m, 0
end

local function fencode(m)
  local fl, s = 0, ''
  if m.fv ~= nil then
    if m.ft == 1 then fl = 3; s = struct.pack('>I4I5', m.fe, m.fv)
    else fl = 1; s = struct.pack('>I4I5I4', m.fe, m.fv, m.fs) end
  end
  if m.pe ~= nil then fl = fl + 4; s = s .. struct.pack('>I4I2I4', m.pe, m.pc, m.pl) end
  return string.char(fl) .. s
end

local function lrec(v)
  local ver, ttl, rem = dec(v)
  if ver == nil then return nil end
  local exp = NEVER
  if ttl > 0 then exp = ver + ttl * 1000 end
  return {ver, rem, exp, v}
end

local function lgreater(a, b)
  return a[1] > b[1] or (a[1] == b[1] and (a[2] > b[2] or (a[2] == b[2] and a[3] > b[3])))
end

-- the buyer's hash: expired and corrupt fields dropped, legacy fields collected
for i = 1, #raw, 2 do
  local f, v = raw[i], raw[i + 1]
  local c = string.byte(f, 1)
  local base, kind = nil, nil
  if c == 45 then
    local r = lrec(v)
    if r == nil or r[3] <= now then drop[#drop + 1] = f else lists[f] = r end
  else
    if c ~= nil and c >= 48 and c <= 57 then
      local n = tonumber(f)
      if n ~= nil and string.find(f, '^[1-9]%d*$') ~= nil and n < 2^53 then
        local k = n % 4
        if k == 0 then base = f else base = string.format('%.0f', n - k); kind = k end
      end
    elseif c == 102 then base = f
    elseif c == 97 then base = 'f' .. string.sub(f, 2); kind = 1
    elseif c == 111 then base = 'f' .. string.sub(f, 2); kind = 2
    elseif c == 112 then base = 'f' .. string.sub(f, 2); kind = 3 end
    if base == nil then
      drop[#drop + 1] = f
    elseif kind == nil then
      local r = fparse(v)
      local changed = false
      if r ~= nil then r, changed = live(r) end
      if r == nil then drop[#drop + 1] = f
      else
        r.raw = v
        facts[f] = r
        if changed then r.raw = fencode(r); touched[f] = true end
      end
    else
      drop[#drop + 1] = f
      local ver, ttl, tomb = dec(v)
      if ver ~= nil and ver + ttl * 1000 > now then
        local g = legacy[base]
        if g == nil then g = {}; legacy[base] = g end
        g[kind] = {ver, tomb, ver + ttl * 1000}
      end
    end
  end
end

-- legacy records -> facts of their seller (pricing_service.membership.layout.legacy_facts)
local function ceil_s(ms) return math.ceil(ms / 1000) end
local converted = 0
for base, g in pairs(legacy) do
  converted = converted + 1
  local r = {}
  local a, o, p = g[1], g[2], g[3]
  if a ~= nil then
    r.fv, r.ft, r.fe, r.fs = a[1] - EPOCH, a[2], ceil_s(a[3]), 0
    if a[2] == 0 then
      local since = a[1]
      if o ~= nil and o[2] == 0 then since = math.min(o[1] - old_min, a[1]) end
      r.fs = math.min(math.max(ceil_s(since), 0), 4294967295)
    end
  end
  if p ~= nil and p[2] == 0 then r.pe, r.pc, r.pl = ceil_s(p[3]), 1, 0 end
  if r.fv ~= nil or r.pe ~= nil then
    local m = fmerge(facts[base], r)
    m.raw = fencode(m)
    facts[base] = m
    touched[base] = true
  end
end

-- the writes, in order
local applied, stale = 0, 0
for i = 3, #ARGV, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if string.byte(f, 1) == 45 then
    local r = lrec(v)
    local old = lists[f]
    if r == nil or (old ~= nil and not lgreater(r, old)) then stale = stale + 1
    else
      applied = applied + 1
      touched[f] = true
      if r[3] <= now then lists[f] = nil else lists[f] = r end
    end
  else
    local r = fparse(v)
    local changed = false
    if r ~= nil then r, changed = live(r) end
    if r == nil then stale = stale + 1
    else
      local m, same = fmerge(facts[f], r)
      if same == 1 then stale = stale + 1
      else
        applied = applied + 1
        if same == 2 and not changed then m.raw = v else m.raw = fencode(m) end
        facts[f] = m
        touched[f] = true
      end
    end
  end
end

-- write back: one HDEL and one HSET per chunk (unpack is limited to a few thousand values)
local del, set = {}, {}
for i = 1, #drop do
  if touched[drop[i]] == nil then del[#del + 1] = drop[i] end
end
local maxexp, forever = -1, false
for f, r in pairs(facts) do
  if r.fv ~= nil and r.fe * 1000 > maxexp then maxexp = r.fe * 1000 end
  if r.pe ~= nil and r.pe * 1000 > maxexp then maxexp = r.pe * 1000 end
end
for f, r in pairs(lists) do
  if r[3] == NEVER then forever = true elseif r[3] > maxexp then maxexp = r[3] end
end
for f, _ in pairs(touched) do
  local r = facts[f]
  if r ~= nil then set[#set + 1] = f; set[#set + 1] = r.raw
  else
    local l = lists[f]
    if l ~= nil then set[#set + 1] = f; set[#set + 1] = l[4] else del[#del + 1] = f end
  end
end
for i = 1, #del, 4000 do
  redis.call('HDEL', key, unpack(del, i, math.min(i + 3999, #del)))
end
for i = 1, #set, 4000 do
  redis.call('HSET', key, unpack(set, i, math.min(i + 3999, #set)))
end
if forever then
  redis.call('PERSIST', key)
elseif maxexp >= 0 then
  redis.call('PEXPIREAT', key, string.format('%.0f', maxexp))
end
return {applied, stale, converted}
"""

#: Atomic, order-independent merge of one buyer's writes.
#: KEYS[1] = buyer hash; ARGV[1] = now (ms since 1970); ARGV[2] = the old-fan threshold (ms) of
#: the legacy records being converted; then pairs (field, value): a fact value merged into a
#: fact field (follow last-writer-wins, purchases by maxima) or a list entry into a list field
#: (newest change wins). Expired parts and fields, corrupt fields and legacy fields are dealt
#: with first (module docstring). Returns {applied, stale, converted}: a write is stale when it
#: changes nothing (older, equal, already expired or undecodable); converted = the sellers whose
#: legacy records were converted. A call without writes only converts and cleans up.
APPLY_LUA: Final = _APPLY.replace("%EPOCH%", str(EPOCH_MS))

#: The list crowd registry (``crowd_lists_key``): KEYS[1]; ARGV pairs (name, handle). Registers
#: each name unless it already has a newer (greater) handle: handles only grow, so a late
#: registration of a deleted crowd never hides the crowd created under its id afterwards.
REGISTER_LISTS_LUA: Final = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if cur == nil or cur < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""
#: KEYS[1] = the registry; ARGV pairs (name, handle): unregisters each name still holding it.
UNREGISTER_LISTS_LUA: Final = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""
