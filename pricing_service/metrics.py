"""Prometheus metrics of one process, in a registry of its own (no global state).

The registry also carries the standard process and runtime collectors (``process_*``: RSS,
CPU, open files; ``python_gc_*``; ``python_info``), which prometheus_client registers only on
its global default registry. Labelled counters with a closed set of label values start at 0
for each (a series that first appears at 1 hides that increase from ``rate()`` and alerts).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pricing.v1 import admin_pb2, pricing_pb2

#: The methods of the two services (the ``method`` label: the short name).
SERVED_METHODS = tuple(
    m.name
    for f in (pricing_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR)
    for svc in f.services_by_name.values()
    for m in svc.methods
)
#: Why a page answered list prices (``pricing_degraded_answers_total{cause}``).
DEGRADED_CAUSES = (
    "timeout",
    "redis_error",
    "breaker_open",
    "rule_store_timeout",
    "rule_store_error",
    "rule_breaker_open",
)
#: Why CheckDiscountStrict refused (``pricing_strict_refusals_total{reason}``).
STRICT_REFUSAL_REASONS = (
    "SYNC_LAGGING",
    "SYNC_WATERMARK_MISSING",
    "REDIS_UNAVAILABLE",
    "REDIS_TIMEOUT",
    "RULE_STORE_TIMEOUT",
)
#: Membership read anomalies (``pricing_membership_read_anomalies_total{reason}``).
ANOMALY_REASONS = ("no_record", "corrupt_value", "wrong_type")


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """``process_*``, ``python_gc_*`` and ``python_info`` on ``registry`` (read at scrape)."""
    for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
        registry.register(collector)


_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram(Collector):
    """A labelled latency histogram for the per-request path, optionally exported also as a
    request counter (``<counter>_total``: the histogram's count, so the two always agree).

    Same exposition as ``prometheus_client.Histogram`` (cumulative ``le`` buckets, ``+Inf``,
    ``_count``, ``_sum``; no ``_created`` series), at a fraction of its cost per observation:
    one ``bisect`` and two additions on plain Python numbers, instead of a linear bucket scan
    and a lock per updated value (three per observation). Observations come from the event
    loop's thread only; a scrape from the metrics server's thread copies the numbers, so it
    may see an observation in the buckets a moment before it is in the sum (never a count
    that disagrees with the buckets: the count is their total).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        *,
        counter: tuple[str, str] | None = None,
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must be strictly increasing")
        self.counter = counter
        # per label values: [count in each bucket (the last is +Inf only)..., sum]
        self._series: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def child(self, *labelvalues: str) -> list[float]:
        """The numbers of one label combination (created on first use)."""
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}")
        series = self._series.get(labelvalues)
        if series is None:
            series = self._series[labelvalues] = [0.0] * (len(self.bounds) + 2)
        return series

    def observe(self, series: list[float], seconds: float) -> None:
        """Record one observation into a :meth:`child`'s numbers."""
        series[bisect.bisect_left(self.bounds, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        counter = (
            CounterMetricFamily(self.counter[0], self.counter[1], labels=self.labelnames)
            if self.counter
            else None
        )
        for labelvalues, series in list(self._series.items()):
            numbers = list(series)  # one copy: buckets and count from the same instant
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for bound, n in zip(self.bounds, numbers, strict=False):
                total += n
                buckets.append((_le(bound), total))
            total += numbers[len(self.bounds)]
            buckets.append(("+Inf", total))
            hist.add_metric(list(labelvalues), buckets, numbers[-1])
            if counter is not None:
                counter.add_metric(list(labelvalues), total)
        yield hist
        if counter is not None:
            yield counter


def _le(bound: float) -> str:
    """An ``le`` label value as prometheus_client writes it (``0.005``, ``1.0``)."""
    return repr(float(bound))


class Metrics:
    """Every metric the pricing server exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        register_runtime_collectors(r)
        self.rpc_latency = LatencyHistogram(
            "pricing_rpc_latency_seconds",
            "RPC latency",
            ["method", "code"],
            _LATENCY_BUCKETS,
            counter=("pricing_rpc_requests", "RPCs handled"),
            registry=r,
        )
        self.degraded_answers = Counter(
            "pricing_degraded_answers",
            "BatchGetLowestPrice answered with list prices",
            ["cause"],
            registry=r,
        )
        self.strict_refusals = Counter(
            "pricing_strict_refusals",
            "CheckDiscountStrict refused (UNAVAILABLE)",
            ["reason"],
            registry=r,
        )
        self.rule_index_revision = Gauge(
            "pricing_rule_index_revision", "Rule store revision the index reflects", registry=r
        )
        self.rule_index_age = Gauge(
            "pricing_rule_index_age_seconds", "Seconds since the index last synced", registry=r
        )
        self.rule_index_rules = Gauge("pricing_rule_index_rules", "Rules in the index", registry=r)
        self.rule_index_items = Gauge(
            "pricing_rule_index_items",
            "Items the index holds (with rules, or known to have none)",
            registry=r,
        )
        self.rule_index_complete = Gauge(
            "pricing_rule_index_complete",
            "1 while the index holds every item with rules (no misses; below "
            "PRICING_RULE_INDEX_MAX_ITEMS)",
            registry=r,
        )
        lookups = Counter(
            "pricing_rule_index_lookups",
            "Items looked up in a bounded rule index, by result (a miss is read from the store)",
            ["result"],
            registry=r,
        )
        self.rule_index_lookups_hit = lookups.labels("hit")
        self.rule_index_lookups_miss = lookups.labels("miss")
        self.rule_index_evictions = Counter(
            "pricing_rule_index_evictions",
            "Items dropped from the rule index (least recently used) to stay within its bound",
            registry=r,
        )
        self.rule_fetch_seconds = Histogram(
            "pricing_rule_fetch_seconds",
            "Rule store read of a page's rule-index misses",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_rtt = LatencyHistogram(
            "pricing_redis_round_trip_seconds",
            "Membership lookup round trip",
            ["op"],
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.membership_anomalies = Counter(
            "pricing_membership_read_anomalies",
            "Membership reads answered 'not a member' for want of a record: no_record (none of the page's crowds stored: a buyer with no memberships, or lost data), corrupt_value, wrong_type",
            ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "pricing_redis_breaker_open", "1 while the Redis circuit breaker is open", registry=r
        )
        self.rule_breaker_state = Gauge(
            "pricing_rule_store_breaker_open",
            "1 while the breaker of rule-index miss reads is open",
            registry=r,
        )

        # INTERNAL from the first scrape on, per method: the alert on INTERNAL > 0 sees the
        # first one (a series born at 1 has no increase to see)
        for method in SERVED_METHODS:
            self.rpc_latency.child(method, "INTERNAL")
        for cause in DEGRADED_CAUSES:
            self.degraded_answers.labels(cause)
        for reason in STRICT_REFUSAL_REASONS:
            self.strict_refusals.labels(reason)
        for reason in ANOMALY_REASONS:
            self.membership_anomalies.labels(reason)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC: ``pricing_rpc_requests_total`` and ``pricing_rpc_latency_seconds``."""
        self.rpc_latency.observe(self.rpc_latency.child(method, code), seconds)

    def membership_anomaly(self, reason: str) -> None:
        self.membership_anomalies.labels(reason).inc()
