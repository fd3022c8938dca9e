"""Real-time sync: a Redis Streams consumer applying relation events to crowd membership.

Delivery: the consumer reads ``settings.events_stream`` in batches (``XREADGROUP COUNT``) as a
member of ``settings.consumer_group``, applies a batch's writes through one
:meth:`MembershipStore.apply` pipeline and acknowledges the batch in one ``XACK`` after the
writes succeeded: at-least-once; a redelivered event is a harmless duplicate because every write
is last-writer-wins by the event's ``occurred_at``.

Failures:

* *Poison* entries (undecodable, unknown type, missing fields, dated in the future: see
  :mod:`sync_worker.events`) can never apply, whatever the number of redeliveries, so they go
  to ``settings.dead_letter_stream`` with the reason at their first delivery and are
  acknowledged (with ``WAIT`` on, once a replica has the dead letter, like the writes):
  keeping them pending for N redeliveries would only hold the watermark back.
* Entries whose *write* fails (the buyer's key has the wrong type, a script error) stay pending
  and are retried when reclaimed; once an entry has been delivered
  ``settings.stream_max_deliveries`` times it is dead-lettered (reason ``WRITE_FAILED``) and
  acknowledged. The consumer never stalls on an entry.
* On start, after an outage, and every ``stream_claim_idle_ms / 2`` the consumer first re-reads
  its own pending entries, then reclaims entries left pending by any consumer for longer than
  ``stream_claim_idle_ms`` (``XAUTOCLAIM``), e.g. by a consumer that died.
* Redis unreachable: retry with capped exponential backoff, one ``redis_unavailable`` log per
  outage and one ``redis_recovered`` when it is back; the batch in hand is applied and
  acknowledged after recovery. The group is re-created if Redis lost it (a restart without
  persistence). The blocking read is kept shorter than the client's socket timeout.
* :meth:`StreamConsumer.shutdown` (SIGTERM): the batch in hand is finished and acknowledged,
  then :meth:`run` returns.

Watermark rule (contract with ``CheckDiscountStrict``): the key
``MembershipLayout(ns).watermark_key`` holds a decimal integer ``W`` in milliseconds on the Redis
server's clock, meaning *every entry added to the stream with an ID time < W has been applied
or dead-lettered*. It is computed from the group's state, atomically, by one read-only script
(:data:`WATERMARK_LUA`), and never from this consumer's view alone::

    now = Redis TIME
    W   = now                                   if every entry has been delivered to the group
        = ms(first entry after last-delivered)  otherwise (a backlog)
    W   = min(W, ms(oldest pending entry of the group))   if any entry is pending

Entries are delivered in ID order and acknowledged only after their writes succeeded, so every
entry with an ID below that bound has been delivered and acknowledged. Stream IDs are
generated from the same server clock as ``TIME`` and only grow, so the statement stays true
once made; the key is only ever moved forward (:data:`SET_MAX_LUA`). The watermark is
recomputed every ``watermark_interval_ms`` (default 100 ms), also while the stream is idle, so
under steady traffic ``now - W`` stays near the batch latency; the lag is logged
(``stream_progress``) and kept in :attr:`StreamConsumer.stats`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.membership.derive import MembershipWrite, Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import (
    TRANSIENT_ERRORS,
    make_redis,
    socket_timeout_s,
)
from pricing_service.replica_acks import ReplicaAcks
from sync_worker.events import DecodedEvent, PoisonEntry, decode_entry

log = structlog.get_logger("sync_worker.consumer")

#: Errors that mean "Redis is unreachable right now" (retried with backoff); on Redis Cluster
#: also a node failing over (CLUSTERDOWN) or a slot migrating (TRYAGAIN).
OUTAGE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    *TRANSIENT_ERRORS,
)
#: What a failed watermark update may raise (NoScriptError is a ResponseError): retried later.
_WATERMARK_ERRORS: Final[tuple[type[BaseException], ...]] = (*OUTAGE_ERRORS, ResponseError)

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


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def id_ms(entry_id: bytes | str) -> int:
    return int(_s(entry_id).partition("-")[0])


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer since it started."""

    batches: int = 0
    entries: int = 0
    events_applied: int = 0
    writes_applied: int = 0
    writes_stale: int = 0
    expired_events: int = 0
    reclaimed: int = 0
    retried_entries: int = 0
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)
    outages: int = 0
    #: batches whose writes reached a primary with no replica in sync (acknowledged unprotected)
    replication_unprotected: int = 0
    #: WAITs that got fewer replica acknowledgements than required (batch not acknowledged)
    replication_wait_short: int = 0
    watermark_ms: int = 0
    lag_ms: int = -1
    pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "entries": self.entries,
            "events_applied": self.events_applied,
            "writes_applied": self.writes_applied,
            "writes_stale": self.writes_stale,
            "expired_events": self.expired_events,
            "reclaimed": self.reclaimed,
            "retried_entries": self.retried_entries,
            "dead_lettered": dict(self.dead_lettered),
            "outages": self.outages,
            "replication_unprotected": self.replication_unprotected,
            "replication_wait_short": self.replication_wait_short,
            "watermark_ms": self.watermark_ms,
            "lag_ms": self.lag_ms,
            "pending": self.pending,
        }


Entry = tuple[bytes, dict[bytes, bytes]]


class _Scripts:
    """EVALSHA with a reload after NOSCRIPT (Redis restarted or SCRIPT FLUSH)."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha: str | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        for attempt in range(2):
            if self.sha is None:
                self.sha = _s(await self.redis.script_load(self.source))
            try:
                return await self.redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.sha = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class StreamConsumer:
    """One member of the consumer group. ``await run()`` until :meth:`shutdown`.

    Use as ``async with StreamConsumer(settings) as c: await c.run()``; the client is closed on
    exit when the consumer created it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis: aioredis.Redis | None = None,
        clock: Clock | None = None,
        consumer_name: str | None = None,
        watermark_interval_ms: int = 100,
        progress_interval_s: float = 10.0,
        trim_retention_ms: int | None = 24 * 3600 * 1000,
        stream: str | None = None,
        watermark_streams: Sequence[str] | None = None,
        publish_watermark: bool = True,
    ) -> None:
        """``stream`` overrides ``settings.events_stream`` (one partition of several, see
        :mod:`sync_worker.partitions`). The watermark is the minimum over ``watermark_streams``
        (default: ``[stream]``); with ``publish_watermark=False`` it is only computed (stats,
        trimming), and another consumer publishes the key."""
        self.settings = settings
        block = settings.stream_block_ms
        self._owns_redis = redis is None
        self.redis = redis or make_redis(
            settings, socket_timeout_ms=block + 5000, max_connections=8
        )
        timeout = socket_timeout_s(self.redis)
        if block and timeout:  # keep a blocking read well inside the socket timeout
            block = max(min(block, int(timeout * 1000) - 500), 1) if timeout > 0.6 else 0
        self.block_ms: int | None = block or None
        self.clock = clock or SystemClock()
        self.layout = MembershipLayout(settings.redis_namespace)
        self.store = MembershipStore(
            self.redis, self.layout, self.clock, old_fan_min_days=settings.old_fan_min_days
        )
        self.ttls = Ttls.from_seconds(
            settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
        )
        self.stream = stream or settings.events_stream
        self.watermark_streams = list(watermark_streams or [self.stream])
        self.publish_watermark = publish_watermark
        self.replica_acks: ReplicaAcks | None = None
        if settings.redis_wait_replicas > 0:
            self.replica_acks = ReplicaAcks(
                self.redis,
                f"{settings.redis_namespace}sync:replica-ack:",
                replicas=settings.redis_wait_replicas,
                timeout_ms=settings.redis_wait_timeout_ms,
            )
        self._unprotected: set[str] = set()  # primaries last seen without a replica
        self.group = settings.consumer_group
        self.name = consumer_name or settings.consumer_name or default_consumer_name()
        self.watermark_interval_s = watermark_interval_ms / 1000
        self.progress_interval_s = progress_interval_s
        self.trim_retention_ms = trim_retention_ms
        self.reclaim_interval_s = max(settings.stream_claim_idle_ms / 2000, 0.1)
        self.stats = ConsumerStats()
        self._wm_compute = _Scripts(self.redis, WATERMARK_LUA)
        self._wm_set = _Scripts(self.redis, SET_MAX_LUA)
        self._stop = asyncio.Event()
        self._wm_stop = asyncio.Event()
        self._in_hand: list[Entry] = []
        self._setup_needed = True
        self._next_reclaim = 0.0
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self._last_trim = 0.0
        self.running = False

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> StreamConsumer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
        if self._owns_redis:
            await self.redis.aclose()

    def shutdown(self) -> None:
        """Finish the batch in hand, acknowledge it, and make :meth:`run` return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Consume until :meth:`shutdown`; survives Redis outages."""
        self.running = True
        self._wm_stop.clear()
        log.info(
            "stream_consumer_started",
            stream=self.stream,
            group=self.group,
            consumer=self.name,
            batch=self.settings.stream_batch_size,
            block_ms=self.block_ms,
        )
        wm_task = asyncio.create_task(self._watermark_loop())
        try:
            while not self.stopping:
                try:
                    await self._step()
                    self._recovered()
                except OUTAGE_ERRORS as exc:
                    await self._outage(exc)
                except ResponseError as exc:
                    if str(exc).startswith("UNBLOCKED"):
                        # a blocked XREADGROUP ends like this when its master became a
                        # replica (Redis Cluster failover): the client follows the new master
                        await self._outage(exc)
                        continue
                    if "NOGROUP" in str(exc):  # Redis lost the stream or the group
                        log.warning("stream_group_missing", stream=self.stream, group=self.group)
                        self._setup_needed = True
                        continue
                    raise
            if self._in_hand:  # stopped during an outage: try once more to finish the batch
                with contextlib.suppress(*OUTAGE_ERRORS):
                    await self._process(self._in_hand)
                    self._in_hand = []
        finally:
            # not Task.cancel(): redis-py may swallow a cancellation that lands inside a command
            self._wm_stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wm_task), 10)
            if not wm_task.done():
                wm_task.cancel()
            with contextlib.suppress(*OUTAGE_ERRORS, ResponseError):
                await self.update_watermark()
            self.running = False
            log.info(
                "stream_consumer_stopped",
                consumer=self.name,
                unacknowledged=len(self._in_hand),
                **self.stats.as_dict(),
            )

    # --- one step of the loop ----------------------------------------------------------------
    async def _step(self) -> None:
        if self._in_hand:  # a batch interrupted by an outage
            self.stats.retried_entries += len(self._in_hand)
            await self._process(self._in_hand)
            self._in_hand = []
        if self._setup_needed:
            await self.ensure_group()
            await self._drain_own_pending()
            await self._reclaim()
            self._setup_needed = False
        elif time.monotonic() >= self._next_reclaim:
            await self._reclaim()
        reply = await self.redis.xreadgroup(
            self.group,
            self.name,
            {self.stream: ">"},
            count=self.settings.stream_batch_size,
            block=self.block_ms,
        )
        entries = self._entries(reply)
        if entries:
            self._in_hand = entries
            await self._process(entries)
            self._in_hand = []
        elif self.block_ms is None:
            await self._sleep(0.01)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("stream_group_created", stream=self.stream, group=self.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drain_own_pending(self) -> None:
        """Re-read entries delivered to this consumer name but never acknowledged."""
        start: bytes | str = "0"
        while not self.stopping:
            reply = await self.redis.xreadgroup(
                self.group, self.name, {self.stream: start}, count=self.settings.stream_batch_size
            )
            entries = self._entries(reply)
            if not entries:
                return
            self.stats.reclaimed += len(entries)
            start = entries[-1][0]
            self._in_hand = entries
            await self._process(entries)
            self._in_hand = []

    async def _reclaim(self) -> None:
        """XAUTOCLAIM entries idle longer than the threshold, from any consumer, and apply them."""
        self._next_reclaim = time.monotonic() + self.reclaim_interval_s
        cursor: bytes | str = "0-0"
        while not self.stopping:
            reply = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.name,
                self.settings.stream_claim_idle_ms,
                start_id=cursor,
                count=self.settings.stream_batch_size,
            )
            cursor = reply[0]
            entries = [(eid, fields or {}) for eid, fields in reply[1]]
            if entries:
                self.stats.reclaimed += len(entries)
                log.info("stream_entries_reclaimed", count=len(entries), consumer=self.name)
                self._in_hand = entries
                await self._process(entries)
                self._in_hand = []
            if _s(cursor) == "0-0":
                return

    @staticmethod
    def _entries(reply: Any) -> list[Entry]:
        if not reply:
            return []
        out: list[Entry] = []
        items = reply.values() if isinstance(reply, dict) else (r[1] for r in reply)
        for got in items:
            stream_entries = got[0] if got and isinstance(got[0], list) else got  # RESP3 shape
            for eid, fields in stream_entries:
                out.append((eid, fields or {}))
        return out

    # --- applying a batch ----------------------------------------------------------------------
    async def _process(self, entries: list[Entry]) -> None:
        now = self.clock.now_ms()
        max_len = self.settings.max_id_length
        writes: list[MembershipWrite] = []
        ack: list[bytes] = []
        users: dict[bytes, str] = {}
        poison: list[tuple[Entry, str, str]] = []
        expired = 0
        for entry in entries:
            eid, fields = entry
            if not fields:  # deleted from the stream while pending: nothing to apply
                ack.append(eid)
                continue
            try:
                ev: DecodedEvent = decode_entry(fields, now_ms=now, max_id_length=max_len)
            except PoisonEntry as exc:
                poison.append((entry, exc.reason, exc.detail))
                continue
            if ev.expired:
                expired += 1
                ack.append(eid)
                continue
            writes.extend(ev.writes(self.ttls))
            users[eid] = ev.user_id
        result = await self.store.apply(writes)
        failed: list[tuple[Entry, str, str]] = []
        if result.failed_users:
            deliveries = await self._deliveries([e for e in entries if e[0] in users])
            for entry in entries:
                user = users.get(entry[0])
                if user is None:
                    continue
                if user not in result.failed_users:
                    ack.append(entry[0])
                elif deliveries.get(entry[0], 1) >= self.settings.stream_max_deliveries:
                    failed.append((entry, "WRITE_FAILED", result.failed_users[user]))
                else:
                    log.warning(
                        "stream_entry_write_failed",
                        entry_id=_s(entry[0]),
                        user_id=user,
                        deliveries=deliveries.get(entry[0], 1),
                        error=result.failed_users[user],
                    )
        else:
            ack.extend(users)
        dead = poison + failed
        if dead:  # dead letters first: like the writes, they must reach a replica before XACK
            await self._dead_letter(dead, now)
            ack.extend(eid for (eid, _), _, _ in dead)
        if self.replica_acks is not None:
            written = {u for u in users.values() if u not in result.failed_users}
            keys = [self.layout.user_key(u) for u in written] if writes else []
            if dead:
                keys.append(self.settings.dead_letter_stream)
            if keys and not await self._await_replicas(keys):
                return  # stopping before a replica confirmed: leave the batch pending
        if ack:
            await self.redis.xack(self.stream, self.group, *ack)
        for (eid, _), reason, detail in dead:
            self.stats.dead_lettered[reason] += 1
            log.warning(
                "stream_entry_dead_lettered", entry_id=_s(eid), reason=reason, detail=detail
            )
        st = self.stats
        st.batches += 1
        st.entries += len(entries)
        st.events_applied += len(users)
        st.expired_events += expired
        st.writes_applied += result.applied
        st.writes_stale += result.stale

    async def _dead_letter(self, dead: list[tuple[Entry, str, str]], now: int) -> None:
        """XADD each entry, with its reason, to the dead-letter stream (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for (eid, fields), reason, detail in dead:
            letter: dict[bytes | str, bytes | str] = {k: v for k, v in fields.items()}
            letter.update(
                {
                    "dl_reason": reason,
                    "dl_detail": detail[:500],
                    "dl_source_stream": self.stream,
                    "dl_source_id": eid,
                    "dl_consumer": self.name,
                    "dl_at_ms": str(now),
                }
            )
            pipe.xadd(self.settings.dead_letter_stream, letter)  # type: ignore[arg-type]
        await pipe.execute()

    async def _await_replicas(self, keys: list[str]) -> bool:
        """Until the writes to ``keys`` reached a replica on every primary that has one.

        A primary without a replica in sync cannot protect the writes: they are acknowledged
        anyway (the alternative is to stop consuming), counted and logged
        (``replication_unprotected``, once per episode). A short ``WAIT`` is counted, logged
        (``replication_wait_short``) and retried; the batch is not acknowledged meanwhile.
        Returns False only when stopping before the replicas confirmed.
        """
        assert self.replica_acks is not None
        attempt = 0
        while True:
            r = await self.replica_acks.wait(keys)
            unprotected = set(r.unprotected or ())
            if unprotected:
                self.stats.replication_unprotected += 1
                if unprotected - self._unprotected:
                    log.warning(
                        "replication_unprotected",
                        primaries=sorted(unprotected - self._unprotected),
                        detail="no replica in sync: membership writes acknowledged without WAIT",
                    )
            protected_again = self._unprotected & (set(r.names or ()) - unprotected)
            if protected_again:
                log.info("replication_protected", primaries=sorted(protected_again))
            self._unprotected = (self._unprotected - protected_again) | unprotected
            if r.ok:
                return True
            attempt += 1
            self.stats.replication_wait_short += 1
            log.warning(
                "replication_wait_short",
                primaries=r.short,
                attempt=attempt,
                replicas=self.replica_acks.replicas,
                timeout_ms=self.replica_acks.timeout_ms,
            )
            if self.stopping:
                return False
            await self._sleep(min(0.05 * 2**attempt, 1.0))

    async def _deliveries(self, entries: list[Entry]) -> dict[bytes, int]:
        """Delivery count of each entry (XPENDING), for the dead-letter decision."""
        pipe = self.redis.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        out: dict[bytes, int] = {}
        for (eid, _), reply in zip(entries, await pipe.execute(), strict=True):
            if reply:
                out[eid] = int(reply[0]["times_delivered"])
        return out

    # --- watermark ---------------------------------------------------------------------------
    async def update_watermark(self) -> int | None:
        """Recompute the watermark from the group's state and move the key forward."""
        w: int | None = None
        now: int | None = None
        pending = 0
        for stream in self.watermark_streams:  # partitions: the minimum over all of them
            ws, nows, pend, _backlog = await self._wm_compute([stream], [self.group])
            if int(ws) < 0:
                return None
            w = int(ws) if w is None else min(w, int(ws))
            now = int(nows) if now is None else max(now, int(nows))
            pending += int(pend)
        if w is None or now is None:
            return None
        if self.publish_watermark:
            current = int(await self._wm_set([self.layout.watermark_key], [str(w)]))
        else:
            current = w
        self.stats.watermark_ms = current
        self.stats.lag_ms = int(now) - current
        self.stats.pending = int(pending)
        return current

    async def _watermark_loop(self) -> None:
        next_progress = time.monotonic() + self.progress_interval_s
        while not self._wm_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wm_stop.wait(), self.watermark_interval_s)
            if self._wm_stop.is_set():
                return
            try:
                await self.update_watermark()
                if self.trim_retention_ms is not None and self.stats.watermark_ms > 0:
                    await self._maybe_trim()
            except _WATERMARK_ERRORS as exc:
                log.debug("watermark_update_failed", error=str(exc))
                continue
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + self.progress_interval_s
                log.info("stream_progress", consumer=self.name, **self.stats.as_dict())

    async def _maybe_trim(self) -> None:
        """Drop entries applied more than ``trim_retention_ms`` ago (below the watermark)."""
        if time.monotonic() - self._last_trim < 60:
            return
        self._last_trim = time.monotonic()
        assert self.trim_retention_ms is not None
        minid = self.stats.watermark_ms - self.trim_retention_ms
        if minid > 0:
            await self.redis.xtrim(self.stream, minid=str(minid), approximate=True)

    # --- outages -------------------------------------------------------------------------------
    async def _outage(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._outage_attempts = 0
            self.stats.outages += 1
            log.warning(
                "redis_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                unacknowledged=len(self._in_hand),
            )
        self._outage_attempts += 1
        self._setup_needed = True
        delay = min(0.05 * 2 ** min(self._outage_attempts, 10), 2.0) * random.uniform(0.5, 1.0)
        await self._sleep(delay)

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info(
                "redis_recovered",
                outage_ms=round((time.monotonic() - self._outage_since) * 1000),
                attempts=self._outage_attempts,
            )
            self._outage_since = None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
