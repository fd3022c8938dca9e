"""The consumer's replication guard: a batch is acknowledged only once its writes reached a
replica (``PRICING_REDIS_WAIT_REPLICAS``), with :class:`~pricing_service.replica_acks.ReplicaAcks`.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
import structlog

from pricing_service.config import Settings
from pricing_service.replica_acks import ReplicaAcks
from sync_worker.stats import ConsumerStats

log = structlog.get_logger("sync_worker.consumer")


class ReplicationGuard:
    """Waits until a batch's writes reached a replica on every primary that has one."""

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, stats: ConsumerStats, stop: asyncio.Event
    ) -> None:
        self.acks = ReplicaAcks(
            redis,
            f"{settings.redis_namespace}sync:replica-ack:",
            replicas=settings.redis_wait_replicas,
            timeout_ms=settings.redis_wait_timeout_ms,
        )
        self.stats = stats
        self._stop = stop
        self._unprotected: set[str] = set()  # primaries last seen without a replica

    async def wait(self, keys: list[str]) -> bool:
        """Until the writes to ``keys`` reached a replica on every primary that has one.

        A primary without a replica in sync cannot protect the writes: they are acknowledged
        anyway (the alternative is to stop consuming), counted and logged
        (``replication_unprotected``, once per episode). A short ``WAIT`` is counted, logged
        (``replication_wait_short``) and retried; the batch is not acknowledged meanwhile.
        Returns False only when stopping before the replicas confirmed.
        """
        attempt = 0
        while True:
            r = await self.acks.wait(keys)
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
                replicas=self.acks.replicas,
                timeout_ms=self.acks.timeout_ms,
            )
            if self._stop.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(0.05 * 2**attempt, 1.0))
