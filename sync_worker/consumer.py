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
* Redis unreachable: retry under the one policy (:class:`pricing_service.redis_errors.Outage`:
  capped exponential backoff, one ``redis_unavailable`` log per outage and one
  ``redis_recovered`` when it is back); the batch in hand is applied and
  acknowledged after recovery. The group is re-created if Redis lost it (a restart without
  persistence). The blocking read is kept shorter than the client's socket timeout.
* :meth:`StreamConsumer.shutdown` (SIGTERM): the batch in hand is finished and acknowledged,
  then :meth:`run` returns.

Watermark (contract with ``CheckDiscountStrict``, :mod:`pricing_service.watermark`): the loop
recomputes it from the group's state every ``watermark_interval_ms`` (default 100 ms), also
while the stream is idle, so under steady traffic ``now - W`` stays near the batch latency; the
loop of partition 0 publishes it (the minimum over the partitions), the lag is logged
(``stream_progress``) and kept in :attr:`StreamConsumer.stats`.

A process runs one such loop per stream partition through
:class:`~sync_worker.partitions.PartitionedConsumer` (one partition is the ordinary case).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.membership.derive import MembershipWrite, Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import make_redis, socket_timeout_s
from pricing_service.redis_errors import TRANSIENT_ERRORS, Outage
from pricing_service.watermark import WatermarkWriter, watermark_duty
from sync_worker.events import DecodedEvent, PoisonEntry, decode_entry
from sync_worker.replication import ReplicationGuard
from sync_worker.stats import ConsumerStats

log = structlog.get_logger("sync_worker.consumer")

#: What a failed watermark update may raise (NoScriptError is a ResponseError): retried later.
_WATERMARK_ERRORS: Final[tuple[type[BaseException], ...]] = (*TRANSIENT_ERRORS, ResponseError)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def id_ms(entry_id: bytes | str) -> int:
    return int(_s(entry_id).partition("-")[0])


Entry = tuple[bytes, dict[bytes, bytes]]


class StreamConsumer:
    """The consumer loop of one stream partition, a member of the consumer group.
    ``await run()`` until :meth:`shutdown`.

    A process runs one per partition through :class:`~sync_worker.partitions.PartitionedConsumer`
    (with one partition, one loop); alone (tests, tools) use it as
    ``async with StreamConsumer(settings) as c: await c.run()``. The client is closed on exit
    when the loop created it.
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
        streams: Sequence[str] | None = None,
        partition: int = 0,
    ) -> None:
        """``streams`` are every partition's stream (default: ``[settings.events_stream]``);
        this loop reads ``streams[partition]``, and its share of the watermark is
        :func:`~pricing_service.watermark.watermark_duty`'s."""
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
        all_streams = list(streams or [settings.events_stream])
        self.stream = all_streams[partition]
        self.group = settings.consumer_group
        wm_streams, publish = watermark_duty(partition, all_streams)
        self.watermark = WatermarkWriter(
            self.redis, self.layout.watermark_key, self.group, wm_streams, publish=publish
        )
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        self.replication: ReplicationGuard | None = None
        if settings.redis_wait_replicas > 0:
            self.replication = ReplicationGuard(self.redis, settings, self.stats, self._stop)
        self.replica_acks = self.replication.acks if self.replication is not None else None
        self.name = consumer_name or settings.consumer_name or default_consumer_name()
        self.watermark_interval_s = watermark_interval_ms / 1000
        self.progress_interval_s = progress_interval_s
        self.trim_retention_ms = trim_retention_ms
        self.reclaim_interval_s = max(settings.stream_claim_idle_ms / 2000, 0.1)
        self._wm_stop = asyncio.Event()
        self._in_hand: list[Entry] = []
        self._setup_needed = True
        self._next_reclaim = 0.0
        self._outage = Outage()
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
                    self._outage.recovered()
                except TRANSIENT_ERRORS as exc:
                    await self._outage_pause(exc)
                except ResponseError as exc:
                    if str(exc).startswith("UNBLOCKED"):
                        # a blocked XREADGROUP ends like this when its master became a
                        # replica (Redis Cluster failover): the client follows the new master
                        await self._outage_pause(exc)
                        continue
                    if "NOGROUP" in str(exc):  # Redis lost the stream or the group
                        log.warning("stream_group_missing", stream=self.stream, group=self.group)
                        self._setup_needed = True
                        continue
                    raise
            if self._in_hand:  # stopped during an outage: try once more to finish the batch
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self._process(self._in_hand)
                    self._in_hand = []
        finally:
            # not Task.cancel(): redis-py may swallow a cancellation that lands inside a command
            self._wm_stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wm_task), 10)
            if not wm_task.done():
                wm_task.cancel()
            with contextlib.suppress(*TRANSIENT_ERRORS, ResponseError):
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
        if self.replication is not None:
            written = {u for u in users.values() if u not in result.failed_users}
            keys = [self.layout.user_key(u) for u in written] if writes else []
            if dead:
                keys.append(self.settings.dead_letter_stream)
            if keys and not await self.replication.wait(keys):
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
        """Recompute the watermark from the group's state (and publish it: partition 0)."""
        got = await self.watermark.update()
        if got is None:
            return None
        self.stats.watermark_ms = got.watermark_ms
        self.stats.lag_ms = got.lag_ms
        self.stats.pending = got.pending
        return got.watermark_ms

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
    async def _outage_pause(self, exc: BaseException) -> None:
        if not self._outage.active:
            self.stats.outages += 1
        delay = self._outage.failed(exc, unacknowledged=len(self._in_hand))
        self._setup_needed = True
        await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
