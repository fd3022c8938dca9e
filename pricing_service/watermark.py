"""The sync watermark: the contract between the sync worker (writes it) and
``CheckDiscountStrict`` (reads it). Both processes import this module; it imports nothing of
either's (``pricing_service`` never imports ``sync_worker``).

The key (``MembershipLayout(ns).watermark_key``) holds a decimal integer ``W`` in milliseconds
on the Redis server's clock, meaning *every entry added to the event streams with an ID time
< W has been applied or dead-lettered*. It is computed from the consumer group's state,
atomically, per stream by one read-only script (:data:`WATERMARK_LUA`), never from one
consumer's view alone::

    now = Redis TIME
    W   = now                                   if every entry has been delivered to the group
        = ms(first entry after last-delivered)  otherwise (a backlog)
    W   = min(W, ms(oldest pending entry of the group))   if any entry is pending

Entries are delivered in ID order and acknowledged only after their writes succeeded, so every
entry with an ID below that bound has been delivered and acknowledged. Stream IDs are
generated from the same server clock as ``TIME`` and only grow, so the statement stays true
once made; the key is only ever moved forward (:data:`SET_MAX_LUA`).

Partitions (``PRICING_EVENT_PARTITIONS``): the published key holds the minimum over every
partition's ``W``. In each worker process the loop of partition 0 computes that minimum and
publishes it; the other loops compute their own partition's value only (stats, trimming):
:func:`watermark_duty`.

Reading: :func:`read` takes ``TIME`` and the key in one step on the node that holds the key
(on Redis Cluster ``TIME`` has no key of its own); the lag is ``now - W``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

#: KEYS[1] = stream, ARGV[1] = group. Returns {W, now, pending, backlog} (W = -1: no stream,
#: -2: no group). Read-only; see the module docstring for the rule.
WATERMARK_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(id) return tonumber(string.match(id, '^(%d+)')) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, now, 0, 0} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local last = nil
for i = 1, #groups do
  local g = groups[i]
  local name, ld = nil, nil
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then ld = g[j + 1] end
  end
  if name == ARGV[1] then last = ld end
end
if last == nil then return {-2, now, 0, 0} end
local w = now
local backlog = 0
local nxt = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #nxt > 0 then
  backlog = 1
  w = ms(nxt[1][1])
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
if p[1] > 0 then
  local m = ms(p[2])
  if m < w then w = m end
end
return {w, now, p[1], backlog}
"""

#: KEYS[1] = watermark key, ARGV[1] = candidate. Moves the value forward only; returns it.
SET_MAX_LUA: Final = """
local cur = tonumber(redis.call('GET', KEYS[1]))
local w = tonumber(ARGV[1])
if cur == nil or w > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return tostring(cur)
"""

#: KEYS[1] = watermark key. Returns {seconds, microseconds, watermark or nil}. Declared
#: ``no-writes`` (Redis 7): CLIENT PAUSE WRITE (a failover in progress) does not hold it back,
#: and a replica could run it.
READ_LUA: Final = """#!lua flags=no-writes
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1])}
"""


@dataclass(frozen=True, slots=True)
class Reading:
    """The published watermark (``None``: none yet) and the server's clock, read together."""

    now_ms: int
    watermark_ms: int | None

    @property
    def lag_ms(self) -> int | None:
        return None if self.watermark_ms is None else self.now_ms - self.watermark_ms


async def read(redis: aioredis.Redis, key: str) -> Reading:
    """``TIME`` and the watermark from the node holding ``key``, in one step."""
    secs, micros, raw = await redis.eval(READ_LUA, 1, key)
    return Reading(int(secs) * 1000 + int(micros) // 1000, None if raw is None else int(raw))


@dataclass(frozen=True, slots=True)
class StreamState:
    """One stream's watermark as the group's state proves it (:data:`WATERMARK_LUA`)."""

    #: ``W``; -1: no stream, -2: no consumer group (nothing consumed it yet)
    watermark_ms: int
    now_ms: int
    pending: int
    backlog: bool

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> StreamState:
        w, now, pending, backlog = reply
        return cls(int(w), int(now), int(pending), int(backlog) != 0)

    @property
    def caught_up(self) -> bool:
        """Every entry delivered and acknowledged."""
        return self.watermark_ms >= 0 and not self.backlog and self.pending == 0


async def stream_state(redis: aioredis.Redis, stream: str, group: str) -> StreamState:
    return StreamState.from_reply(await redis.eval(WATERMARK_LUA, 1, stream, group))


def watermark_duty(index: int, streams: Sequence[str]) -> tuple[list[str], bool]:
    """For the consumer loop of partition ``index`` of ``streams``: the streams its watermark is
    the minimum over, and whether it publishes the key (only the loop of partition 0 does)."""
    if index == 0:
        return list(streams), True
    return [streams[index]], False


@dataclass(frozen=True, slots=True)
class Progress:
    """A watermark update: the value (published or only computed), the lag, pending entries."""

    watermark_ms: int
    lag_ms: int
    pending: int


class _Script:
    """EVALSHA with a reload after NOSCRIPT (Redis restarted or SCRIPT FLUSH)."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha: str | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        for attempt in range(2):
            if self.sha is None:
                sha = await self.redis.script_load(self.source)
                self.sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            try:
                return await self.redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.sha = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class WatermarkWriter:
    """Computes the watermark over ``streams`` for ``group`` and, when ``publish``, moves the
    key forward to it (:func:`watermark_duty` says which loop does what)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        group: str,
        streams: Sequence[str],
        *,
        publish: bool = True,
    ) -> None:
        self.key = key
        self.group = group
        self.streams = list(streams)
        self.publish = publish
        self._compute = _Script(redis, WATERMARK_LUA)
        self._set = _Script(redis, SET_MAX_LUA)

    async def update(self) -> Progress | None:
        """Recompute; ``None`` while a stream or the group does not exist yet."""
        w: int | None = None
        now: int | None = None
        pending = 0
        for stream in self.streams:  # partitions: the minimum over all of them
            st = StreamState.from_reply(await self._compute([stream], [self.group]))
            if st.watermark_ms < 0:
                return None
            w = st.watermark_ms if w is None else min(w, st.watermark_ms)
            now = st.now_ms if now is None else max(now, st.now_ms)
            pending += st.pending
        if w is None or now is None:
            return None
        current = int(await self._set([self.key], [str(w)])) if self.publish else w
        return Progress(current, now - current, pending)
