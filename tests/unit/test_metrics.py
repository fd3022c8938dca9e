"""The lean latency histogram exports exactly what prometheus_client's Histogram and Counter
would for the same observations (the text a Prometheus server scrapes)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from pricing_service.metrics import LatencyHistogram, Metrics

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_same_exposition_as_prometheus_client() -> None:
    rng = random.Random(7)
    # bucket bounds exactly, values between them, past the last bound, zero
    values = [*BUCKETS, 0.0, 3.0, 1e-9, *(rng.expovariate(200) for _ in range(500))]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    lean = LatencyHistogram(
        "rpc_latency_seconds", "RPC latency", ["method", "code"], BUCKETS,
        counter=("rpc_requests", "RPCs handled"), registry=ours,
    )  # fmt: skip
    hist = Histogram(
        "rpc_latency_seconds", "RPC latency", ["method", "code"], buckets=BUCKETS, registry=theirs
    )
    count = Counter("rpc_requests", "RPCs handled", ["method", "code"], registry=theirs)
    for i, v in enumerate(values):
        labels = ("Batch", "OK") if i % 3 else ("Strict", "UNAVAILABLE")
        lean.observe(lean.child(*labels), v)
        hist.labels(*labels).observe(v)
        count.labels(*labels).inc()
    assert exposition(ours) == exposition(theirs)


def test_metrics_count_every_rpc_in_both_series() -> None:
    m = Metrics()
    for seconds in (0.0004, 0.003, 0.003, 7.0):
        m.observe_rpc("BatchGetLowestPrice", "OK", seconds)
    m.observe_rpc("BatchGetLowestPrice", "INVALID_ARGUMENT", 0.001)
    get = m.registry.get_sample_value
    ok = {"method": "BatchGetLowestPrice", "code": "OK"}
    assert get("pricing_rpc_requests_total", ok) == 4
    assert get("pricing_rpc_latency_seconds_count", ok) == 4
    assert get("pricing_rpc_latency_seconds_bucket", {**ok, "le": "0.005"}) == 3
    assert get("pricing_rpc_latency_seconds_bucket", {**ok, "le": "2.5"}) == 3
    assert get("pricing_rpc_latency_seconds_bucket", {**ok, "le": "+Inf"}) == 4
    assert get("pricing_rpc_latency_seconds_sum", ok) == pytest.approx(7.0064)
    bad = {"method": "BatchGetLowestPrice", "code": "INVALID_ARGUMENT"}
    assert get("pricing_rpc_requests_total", bad) == 1


def test_refuses_unordered_buckets_and_wrong_labels() -> None:
    with pytest.raises(ValueError, match="increasing"):
        LatencyHistogram("x", "x", [], (0.1, 0.01), registry=CollectorRegistry())
    h = LatencyHistogram("y", "y", ["op"], (0.1,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        h.child("a", "b")
