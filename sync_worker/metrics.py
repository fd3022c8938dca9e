"""Prometheus metrics of ``sync-worker consume`` (``PRICING_WORKER_METRICS_PORT``, bound to
``PRICING_WORKER_METRICS_ADDR``).

Exported from the consumers' own counters at scrape time (a custom collector: nothing on the
hot path), one sample per stream partition, plus the process and runtime collectors
(``process_*``, ``python_gc_*``, ``python_info``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pricing_service.metrics import register_runtime_collectors
from sync_worker.stats import ConsumerStats

_COUNTERS = {
    "entries": ("sync_stream_entries", "Stream entries read"),
    "events_applied": ("sync_events_applied", "Relation events applied to membership"),
    "writes_applied": ("sync_membership_writes_applied", "Membership records written"),
    "writes_stale": (
        "sync_membership_writes_stale",
        "Writes skipped: an equal or newer fact was stored",
    ),
    "reclaimed": ("sync_stream_reclaimed", "Entries reclaimed from dead consumers (XAUTOCLAIM)"),
    "retried_entries": ("sync_stream_retried_entries", "Entries whose batch had to be retried"),
    "outages": ("sync_redis_outages", "Redis outages ridden out"),
    "replication_unprotected": (
        "sync_replication_unprotected_batches",
        "Batches acknowledged while their primary had no replica in sync",
    ),
    "replication_wait_short": (
        "sync_replication_wait_short",
        "WAITs with fewer replica acknowledgements than required (batch not acknowledged)",
    ),
}


class ConsumerCollector(Collector):
    """Reads :class:`ConsumerStats` of every partition's consumer when scraped."""

    def __init__(self, stats: Callable[[], Sequence[tuple[str, ConsumerStats]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        snapshot = list(self._stats())
        for attr, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["stream"])
            for stream, st in snapshot:
                family.add_metric([stream], float(getattr(st, attr)))
            yield family
        dead_total = CounterMetricFamily(
            "sync_dead_letters",
            "Entries sent to the dead-letter stream, all reasons (0 from the start: alert on it)",
            labels=["stream"],
        )
        dead = CounterMetricFamily(
            "sync_dead_lettered",
            "Entries sent to the dead-letter stream",
            labels=["stream", "reason"],
        )
        lag = GaugeMetricFamily(
            "sync_watermark_lag_ms", "Redis time minus the published watermark", labels=["stream"]
        )
        pending = GaugeMetricFamily(
            "sync_stream_pending", "Entries pending in the group", labels=["stream"]
        )
        for stream, st in snapshot:
            for reason, n in st.dead_lettered.items():
                dead.add_metric([stream, reason], float(n))
            dead_total.add_metric([stream], float(sum(st.dead_lettered.values())))
            lag.add_metric([stream], float(st.lag_ms))
            pending.add_metric([stream], float(st.pending))
        yield dead_total
        yield dead
        yield lag
        yield pending


def serve_metrics(
    port: int, stats: Callable[[], Sequence[tuple[str, ConsumerStats]]], addr: str = "127.0.0.1"
) -> Callable[[], None]:
    """Start the HTTP endpoint; returns the function that stops it."""
    registry = CollectorRegistry()
    register_runtime_collectors(registry)
    registry.register(ConsumerCollector(stats))
    httpd, _thread = start_http_server(port, addr=addr, registry=registry)
    return httpd.shutdown
