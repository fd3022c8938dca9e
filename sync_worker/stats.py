"""Counters of one consumer loop (one stream partition), read by logs, ``status`` and metrics."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


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
