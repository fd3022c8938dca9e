"""The membership store: the reader and the writer over one Redis client.

Two modules, one per direction, over the one layout (:mod:`pricing_service.membership.layout`):

* :class:`~pricing_service.membership.reader.MembershipReader` - the page path (one ``HMGET``
  per page), the strict path's read, a buyer's facts, the migration marker, the list registry's
  lookup;
* :class:`~pricing_service.membership.writer.MembershipWriter` - the batched, atomic,
  order-independent writes (the sync worker's write path, the admin API's list changes) and the
  list registry's writes.

:class:`MembershipStore` is both at once, for the code that needs both: the server (the page
path, and the list registry it publishes), the list file loader (registry lookups, then
writes), tools and tests. It only inherits, so a method of either half is called with no
extra step (the page path pays nothing for the façade).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from pricing_service.domain import Clock
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.reader import AnomalySink, CrowdResolver, MembershipReader
from pricing_service.membership.writer import MembershipWriter
from pricing_service.redis_pipe import PipelinedReader


class MembershipStore(MembershipReader, MembershipWriter):
    """The reader and the writer of membership keys over one client (module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: MembershipLayout,
        clock: Clock,
        anomalies: AnomalySink | None = None,
        *,
        reader: PipelinedReader | None = None,
        old_fan_min_days: int = 30,
        crowds: CrowdResolver | None = None,
        legacy_reads: bool = True,
    ) -> None:
        MembershipReader.__init__(
            self,
            redis,
            layout,
            clock,
            anomalies,
            reader=reader,
            old_fan_min_days=old_fan_min_days,
            crowds=crowds,
            legacy_reads=legacy_reads,
        )
        MembershipWriter.__init__(self, redis, layout, clock, old_fan_min_days=old_fan_min_days)
