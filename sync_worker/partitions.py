"""Partitioned relation event streams (``PRICING_EVENT_PARTITIONS``).

With ``N = 1`` (the default) there is one stream, ``PRICING_EVENTS_STREAM``. With ``N > 1``
the events go to ``<events_stream>:{k}`` for ``k`` in ``0..N-1``; the braces are a Redis
Cluster hash tag, so the partitions spread over the cluster's nodes. The producer picks
``k = crc32(user_id) % N``: every event of a buyer lands in one partition, in publication
order.

Consumers: every ``sync-worker consume`` process reads every partition as a member of the one
consumer group (one consumer loop per partition, sharing one client), so adding a worker
process needs no other change: the group spreads each partition's entries over its members.
Applying is order-independent by design (last writer wins by ``occurred_at``), so a buyer's
events may be applied by different workers without changing the result.

Watermark: the contract of :mod:`pricing_service.watermark`: the published key holds the
minimum over the partitions, every event published to any partition before it has been
applied; in each process the loop of partition 0 computes and publishes it.

:class:`PartitionedPublisher` and :class:`PartitionedConsumer` are *the* publisher and consumer
of ``sync-worker``, whatever ``N``: one partition is their ordinary case (one
:class:`~sync_worker.events.EventPublisher`, one :class:`~sync_worker.consumer.StreamConsumer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Mapping, Sequence
from types import TracebackType

import redis.asyncio as aioredis

from pricing.v1 import events_pb2
from pricing_service.config import Settings
from pricing_service.redis_client import make_redis
from sync_worker.consumer import StreamConsumer
from sync_worker.events import EVENT_FIELD, EventPublisher, validate_events


def partition_streams(events_stream: str, partitions: int) -> list[str]:
    """The stream names: ``[events_stream]`` for 1 partition, else ``events_stream:{k}``."""
    if partitions <= 1:
        return [events_stream]
    return [f"{events_stream}:{{{k}}}" for k in range(partitions)]


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a buyer: ``crc32(utf-8 user id) % partitions`` (stable everywhere)."""
    if partitions <= 1:
        return 0
    return zlib.crc32(user_id.encode("utf-8")) % partitions


class PartitionedPublisher:
    """Publishes each event to its buyer's partition (pipelined, in order per partition)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        events_stream: str,
        partitions: int,
        *,
        max_id_length: int = 128,
        chunk: int = 1000,
    ) -> None:
        self.streams = partition_streams(events_stream, partitions)
        self.partitions = partitions
        self.max_id_length = max_id_length
        self._publishers = [
            EventPublisher(redis, s, max_id_length=max_id_length, chunk=chunk) for s in self.streams
        ]

    def stream_of(self, user_id: str) -> str:
        return self.streams[partition_of(user_id, self.partitions)]

    async def publish(
        self,
        events: Sequence[events_pb2.RelationEvent],
        *,
        validate: bool = True,
        now_ms: int | None = None,
    ) -> list[str]:
        """XADD every event to its partition; returns the ids in the order of ``events``.

        Validation (as :meth:`EventPublisher.publish`) covers the whole list before anything
        is published.
        """
        groups: dict[int, list[int]] = {}
        for i, ev in enumerate(events):
            groups.setdefault(partition_of(ev.user_id, self.partitions), []).append(i)
        if validate:  # everything first: nothing is published if one event is bad
            validate_events(events, now_ms=now_ms, max_id_length=self.max_id_length)
        ids: list[str] = [""] * len(events)
        results = await asyncio.gather(
            *(
                self._publishers[k].publish_raw(
                    [{EVENT_FIELD: events[i].SerializeToString()} for i in idx]
                )
                for k, idx in groups.items()
            )
        )
        for (_k, idx), got in zip(groups.items(), results, strict=True):
            for i, eid in zip(idx, got, strict=True):
                ids[i] = eid
        return ids

    async def publish_raw(
        self, user_id: str, entries: Sequence[Mapping[bytes, bytes]]
    ) -> list[str]:
        """Raw entries (no validation) to ``user_id``'s partition (tests: poison on purpose)."""
        k = partition_of(user_id, self.partitions)
        return await self._publishers[k].publish_raw(entries)


class PartitionedConsumer:
    """One :class:`StreamConsumer` per partition in this process, sharing one Redis client.

    Use like a :class:`StreamConsumer`: ``async with PartitionedConsumer(settings) as c:
    await c.run()``; :meth:`shutdown` stops every loop after its batch in hand.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis: aioredis.Redis | None = None,
        consumer_name: str | None = None,
        watermark_interval_ms: int = 100,
        progress_interval_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.streams = partition_streams(settings.events_stream, settings.event_partitions)
        n = len(self.streams)
        self._owns_redis = redis is None
        # every loop holds a connection in its blocking read; leave room for writes and acks
        self.redis = redis or make_redis(
            settings,
            socket_timeout_ms=settings.stream_block_ms + 5000,
            max_connections=2 * n + 8,
        )
        self.consumers = [
            StreamConsumer(
                settings,
                redis=self.redis,
                consumer_name=consumer_name,
                watermark_interval_ms=watermark_interval_ms,
                progress_interval_s=progress_interval_s,
                streams=self.streams,
                partition=k,
            )
            for k in range(n)
        ]

    async def __aenter__(self) -> PartitionedConsumer:
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
        for c in self.consumers:
            c.shutdown()

    async def ensure_groups(self) -> None:
        for c in self.consumers:
            await c.ensure_group()

    async def update_watermark(self) -> int | None:
        return await self.consumers[0].update_watermark()

    async def run(self) -> None:
        """Every partition's loop until :meth:`shutdown`; one failing stops the others."""
        tasks = [asyncio.create_task(c.run(), name=f"consume-{c.stream}") for c in self.consumers]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    self.shutdown()
        finally:
            self.shutdown()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and (exc := t.exception()) is not None:
                raise exc
