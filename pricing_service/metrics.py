"""Prometheus metrics of one process, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric the pricing server exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "pricing_rpc_requests", "RPCs handled", ["method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "pricing_rpc_latency_seconds",
            "RPC latency",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
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
        self.redis_rtt = Histogram(
            "pricing_redis_round_trip_seconds",
            "Membership lookup round trip",
            ["op"],
            buckets=_LATENCY_BUCKETS,
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
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        children = self._rpc_children.get(key)
        if children is None:
            children = (
                self.rpc_requests.labels(method, code),
                self.rpc_latency.labels(method, code),
            )
            self._rpc_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def membership_anomaly(self, reason: str) -> None:
        self.membership_anomalies.labels(reason).inc()
